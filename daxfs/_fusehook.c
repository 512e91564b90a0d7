/*
 * daxfs._fusehook -- add copy_file_range, lseek and fallocate to pyfuse3,
 * and serve read/write without pyfuse3's coroutine machinery.
 *
 * pyfuse3 3.5 builds its struct fuse_lowlevel_ops without these three slots
 * and offers no way to add them.  Instead of patching pyfuse3 we interpose
 * fuse_session_new(): this module exports a symbol of that name with the same
 * symbol version libfuse uses (FUSE_3.0, see _fusehook.map) and promotes
 * itself into the global symbol scope at import time.  pyfuse3's extension is
 * loaded later with RTLD_NOW, so its reference fuse_session_new@FUSE_3.0 binds
 * to us.  We copy the ops table, fill the empty slots and call the real libfuse
 * function, which we look up by address (never by soname).
 *
 * The C callbacks call synchronous Python handlers.  pyfuse3 calls
 * fuse_session_process_buf() with the GIL held, but PyGILState_Ensure() is
 * used so the callbacks stay correct if that ever changes.
 *
 * Fast path (read and write, when Python registers handlers for them): the
 * callbacks reply at once, so a request costs one Python call instead of a
 * coroutine, a trio task step and pyfuse3's bytes copy of the write data.
 * After such a request the callback keeps serving: it polls the FUSE fd for
 * up to `spin_us` microseconds and processes what arrives in place, as long as
 * each request is again one answered synchronously (read, write, the
 * capability getxattr, copy_file_range, lseek, fallocate).  The first request
 * that goes to one of pyfuse3's asynchronous handlers ends the drain: pyfuse3
 * keeps the coroutine that handler created and awaits it when we return, and
 * it can hold only one.  A drain also ends after DRAIN_MAX requests, so trio
 * (signals, other tasks) runs regularly under a steady stream.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_dataplane.h"

#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/uio.h>
#include <unistd.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct libfuse_version; /* only exists in libfuse >= 3.17 headers */

typedef struct fuse_session *(*new_fn)(struct fuse_args *,
                                       const struct fuse_lowlevel_ops *,
                                       size_t, void *);
typedef struct fuse_session *(*new_versioned_fn)(
    struct fuse_args *, const struct fuse_lowlevel_ops *, size_t,
    struct libfuse_version *, void *);

/* Exported interposers.  The asm labels give the symbol names without
 * clashing with whatever prototypes the installed headers declare. */
struct fuse_session *hook_session_new(struct fuse_args *,
                                      const struct fuse_lowlevel_ops *, size_t,
                                      void *) __asm__("fuse_session_new");
struct fuse_session *hook_session_new_versioned(
    struct fuse_args *, const struct fuse_lowlevel_ops *, size_t,
    struct libfuse_version *, void *) __asm__("fuse_session_new_versioned");

static new_fn real_new;                 /* fuse_session_new@FUSE_3.0 */
static new_versioned_fn real_new_v;     /* fuse_session_new_versioned@FUSE_3.17 */
static char libfuse_path[4096];
static char self_path[4096];

/* libfuse copies op_size bytes of the table into the session, so one static
 * copy is enough.  It is larger than our struct in case the caller was built
 * against newer headers with more slots. */
static union {
    struct fuse_lowlevel_ops ops;
    char raw[4096];
} ops_copy;

static void (*orig_init)(void *, struct fuse_conn_info *);
static __thread int in_hook; /* libfuse >= 3.17 may call one variant from the other */
static int hooked;

/* Python handlers (strong refs, protected by the GIL). */
static PyObject *h_cfr, *h_lseek, *h_falloc;
static PyObject *h_kill;                /* kill_privileges(ino, suidgid), see hook_setattr */
static PyObject *h_read, *h_write;      /* fast path; NULL: pyfuse3 serves them */

/* the drain after a synchronously answered request */
#define DRAIN_MAX 256
static struct fuse_session *session;
static long spin_ns;                    /* 0: no drain */
static int draining;
static int answered_sync;               /* set by every callback that replied in place */
static struct fuse_buf drain_buf;
static unsigned long long fast_requests, drained_requests;

/* Connection settings requested from Python (-1 = leave alone). */
static long long opt_max_readahead = -1, opt_max_write = -1,
                 opt_max_background = -1, opt_congestion = -1,
                 opt_time_gran = -1;
static unsigned opt_want_on, opt_want_off;

/* Bits libfuse 3.14 cannot ask for, added to the INIT reply (see io_writev):
 * FUSE_DIRECT_IO_ALLOW_MMAP for dax mode, FUSE_HANDLE_KILLPRIV_V2 (see hook_setattr). */
static int want_dio_mmap, want_killpriv_v2;
static int init_reply_pending;
static int dio_mmap_sent, killpriv_v2_sent;

/* What was negotiated, as handed back to libfuse at the end of init. */
static struct fuse_conn_info conn_seen;
static int conn_valid;

#define SPLICE_CAPS (FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE)

/* ------------------------------------------------------------------ */
/* error reporting                                                     */

/* Log the pending exception through logging.getLogger("daxfs.fusehook") so it
 * ends up wherever the application sends its logs (never bare stderr). */
static void log_exception(const char *what)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v && tb)
        PyException_SetTraceback(v, tb);

    PyObject *logging = PyImport_ImportModule("logging");
    PyObject *logger = logging ? PyObject_CallMethod(logging, "getLogger", "s",
                                                     "daxfs.fusehook") : NULL;
    PyObject *meth = logger ? PyObject_GetAttrString(logger, "exception") : NULL;
    PyObject *args = meth ? Py_BuildValue("(ss)", "%s handler failed; replying EIO",
                                          what) : NULL;
    PyObject *kw = args ? Py_BuildValue("{s:O}", "exc_info", v ? v : Py_None) : NULL;
    PyObject *r = kw ? PyObject_Call(meth, args, kw) : NULL;
    if (!r)  /* logging itself broke: last resort is sys.unraisablehook */
        PyErr_WriteUnraisable(NULL);
    Py_XDECREF(r); Py_XDECREF(kw); Py_XDECREF(args); Py_XDECREF(meth);
    Py_XDECREF(logger); Py_XDECREF(logging);
    Py_XDECREF(t); Py_XDECREF(v); Py_XDECREF(tb);
}

/* Turn the pending exception into an errno for fuse_reply_err(). */
static int exception_errno(const char *what)
{
    if (PyErr_ExceptionMatches(PyExc_OSError)) {
        PyObject *t, *v, *tb;
        int err = 0;
        PyErr_Fetch(&t, &v, &tb);
        PyErr_NormalizeException(&t, &v, &tb);
        PyObject *e = v ? PyObject_GetAttrString(v, "errno") : NULL;
        if (e && PyLong_Check(e))
            err = (int)PyLong_AsLong(e);
        Py_XDECREF(e);
        if (err > 0) {
            PyErr_Clear();
            Py_XDECREF(t); Py_XDECREF(v); Py_XDECREF(tb);
            return err;
        }
        PyErr_Clear();
        PyErr_Restore(t, v, tb); /* OSError without errno: treat as a bug */
    }
    log_exception(what);
    return EIO;
}

/* ------------------------------------------------------------------ */
/* setuid/setgid/capability clearing under FUSE_HANDLE_KILLPRIV_V2     */

/* Why KILLPRIV_V2.  Without it FUSE never sets SB_NOSEC, so before EVERY write
 * through the page cache the kernel's file_remove_privs() asks the daemon for
 * getxattr("security.capability"): a second round trip per write(2), and with
 * the writeback cache the only one.  With it the superblock is SB_NOSEC: an
 * inode whose check found nothing to clear is marked S_NOSEC and not asked
 * again until its attributes are refreshed.  The price is that the kernel then
 * leaves clearing to the server where it used to send SETATTR(mode) itself:
 *  - WRITE carries FUSE_WRITE_KILL_SUIDGID (writer without CAP_FSETID): the
 *    fast-path write handler clears setuid/setgid (Python, fuse_ops);
 *  - SETATTR carries FATTR_KILL_SUIDGID (libfuse passes it on as
 *    FUSE_SET_ATTR_KILL_SUID) for a truncate by such a caller and for every
 *    chown of a non-directory: hook_setattr clears before pyfuse3's setattr;
 *  - fallocate and a copy_file_range target carry no flag at all: the
 *    caller's uid stands in for CAP_FSETID (root keeps the bits, as the
 *    kernel's check would for an ordinary root process);
 *  - security.capability goes on every write(2), truncate, fallocate and copy
 *    target whoever the caller, as ext4 drops it.  (An S_NOSEC inode that gets
 *    one is checked again: the VFS ends S_NOSEC on every security.* setxattr.)
 * Called with the GIL; returns 0 or the errno to reply. */
static int kill_privileges(fuse_ino_t ino, int suidgid)
{
    if (!h_kill)
        return 0;
    PyObject *r = PyObject_CallFunction(h_kill, "Ki", (unsigned long long)ino, suidgid);
    Py_XDECREF(r);
    return r ? 0 : exception_errno("kill_privileges");
}

static int kill_for_caller(fuse_req_t req, fuse_ino_t ino)
{
    if (!killpriv_v2_sent)
        return 0;                       /* the kernel clears what is needed itself */
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    return kill_privileges(ino, !ctx || ctx->uid != 0);
}

static void (*orig_setattr)(fuse_req_t, fuse_ino_t, struct stat *, int,
                            struct fuse_file_info *);

static void hook_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                         struct fuse_file_info *fi)
{
    int kill = to_set & FUSE_SET_ATTR_KILL_SUID;   /* the kernel's FATTR_KILL_SUIDGID */
    if (killpriv_v2_sent && (kill || (to_set & FUSE_SET_ATTR_SIZE))) {
        PyGILState_STATE g = PyGILState_Ensure();
        int err = kill_privileges(ino, kill != 0);
        PyGILState_Release(g);
        if (err) {
            fuse_reply_err(req, err);
            answered_sync = 1;
            return;
        }
    }
    orig_setattr(req, ino, attr, to_set & ~(FUSE_SET_ATTR_KILL_SUID | FUSE_SET_ATTR_KILL_SGID),
                 fi);
}

/* ------------------------------------------------------------------ */
/* the three new operations                                            */

static void hook_copy_file_range(fuse_req_t req, fuse_ino_t ino_in, off_t off_in,
                                 struct fuse_file_info *fi_in, fuse_ino_t ino_out,
                                 off_t off_out, struct fuse_file_info *fi_out,
                                 size_t len, int flags)
{
    int err = 0;
    size_t done = 0;
    PyGILState_STATE g = PyGILState_Ensure();
    if ((err = kill_for_caller(req, ino_out)) != 0) {
        /* replied below */
    } else if (!h_cfr) {
        /* EOPNOTSUPP makes the kernel splice-copy this call; ENOSYS would
         * disable copy_file_range for the whole mount. */
        err = EOPNOTSUPP;
    } else {
        PyObject *r = PyObject_CallFunction(
            h_cfr, "KKLKKLKi", (unsigned long long)ino_in,
            (unsigned long long)fi_in->fh, (long long)off_in,
            (unsigned long long)ino_out, (unsigned long long)fi_out->fh,
            (long long)off_out, (unsigned long long)len, flags);
        if (r) {
            Py_ssize_t n = PyLong_AsSsize_t(r);
            Py_DECREF(r);
            if (n == -1 && PyErr_Occurred()) {
                /* fall through to exception_errno */
            } else if (n < 0 || (size_t)n > len) {
                PyErr_Format(PyExc_ValueError,
                             "copy_file_range handler returned %zd for length %zu",
                             n, len);
            } else {
                done = (size_t)n;
            }
        }
        if (PyErr_Occurred()) {
            err = exception_errno("copy_file_range");
            if (err == ENOSYS)
                err = EOPNOTSUPP; /* see above: never ENOSYS */
        }
    }
    PyGILState_Release(g);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_write(req, done);
    answered_sync = 1;
}

static void hook_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                       struct fuse_file_info *fi)
{
    int err = 0;
    long long res = 0;
    PyGILState_STATE g = PyGILState_Ensure();
    if (!h_lseek) {
        /* Only SEEK_DATA/SEEK_HOLE get here; ENOSYS makes the kernel use
         * generic_file_llseek (whole file is data) from now on. */
        err = ENOSYS;
    } else {
        PyObject *r = PyObject_CallFunction(h_lseek, "KKLi", (unsigned long long)ino,
                                            (unsigned long long)fi->fh,
                                            (long long)off, whence);
        if (r) {
            res = PyLong_AsLongLong(r);
            Py_DECREF(r);
            if (!PyErr_Occurred() && res < 0)
                PyErr_Format(PyExc_ValueError, "lseek handler returned %lld", res);
        }
        if (PyErr_Occurred())
            err = exception_errno("lseek");
    }
    PyGILState_Release(g);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_lseek(req, (off_t)res);
    answered_sync = 1;
}

static void hook_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                           off_t length, struct fuse_file_info *fi)
{
    int err = 0;
    PyGILState_STATE g = PyGILState_Ensure();
    if ((err = kill_for_caller(req, ino)) != 0) {
        /* replied below */
    } else if (!h_falloc) {
        err = EOPNOTSUPP; /* ENOSYS would disable fallocate for the mount */
    } else {
        PyObject *r = PyObject_CallFunction(h_falloc, "KKiLL", (unsigned long long)ino,
                                            (unsigned long long)fi->fh, mode,
                                            (long long)offset, (long long)length);
        Py_XDECREF(r);
        if (!r)
            err = exception_errno("fallocate");
    }
    PyGILState_Release(g);
    fuse_reply_err(req, err);
    answered_sync = 1;
}

/* ------------------------------------------------------------------ */
/* read and write without a coroutine, then drain                      */

/* Serve requests that are already queued or arrive within spin_ns, in place
 * (see the comment at the top).  Called with the GIL held, after a reply. */
static void drain(void)
{
    if (draining || spin_ns <= 0 || !session)
        return;
    /* With the data plane running, fuse_session_fd() and fuse_session_receive_buf() are
     * its queue of the requests its threads leave to Python (_dataplane.c): the same loop
     * then drains that queue. */
    draining = 1;
    struct pollfd pfd = {.fd = fuse_session_fd(session), .events = POLLIN};
    long long deadline = mono_ns() + spin_ns;
    for (int n = 0; n < DRAIN_MAX && !fuse_session_exited(session);) {
        int r = poll(&pfd, 1, 0);
        if (r <= 0 || !(pfd.revents & POLLIN)) {
            if (r < 0 || pfd.revents || mono_ns() > deadline)
                break;
            continue;
        }
        int res = fuse_session_receive_buf(session, &drain_buf);
        if (res == -EINTR || res == -EAGAIN)
            continue;
        if (res <= 0)
            break;
        answered_sync = 0;
        fuse_session_process_buf(session, &drain_buf);
        n++;
        drained_requests++;
        if (!answered_sync)
            break;          /* went to pyfuse3: it awaits that coroutine when we return */
        deadline = mono_ns() + spin_ns;
    }
    draining = 0;
}

static void hook_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    int err = 0;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *r = PyObject_CallFunction(h_read, "KLn", (unsigned long long)fi->fh,
                                        (long long)off, (Py_ssize_t)size);
    if (r) {
        Py_buffer view;
        if (PyObject_GetBuffer(r, &view, PyBUF_CONTIG_RO) == 0) {
            if ((size_t)view.len > size)
                view.len = (Py_ssize_t)size;
            fuse_reply_buf(req, view.buf, (size_t)view.len);
            PyBuffer_Release(&view);
        }
        Py_DECREF(r);       /* a view of the image: dropped before the next request */
    }
    if (PyErr_Occurred()) {
        err = exception_errno("read");
        fuse_reply_err(req, err);
    }
    fast_requests++;
    answered_sync = 1;
    drain();
    PyGILState_Release(g);
}

/* The write_flags of this WRITE request (FUSE_WRITE_CACHE, FUSE_WRITE_KILL_SUIDGID, ...).
 * libfuse (3.14) hands the write callback neither them nor the request: but its do_write()
 * passes, for a request read into memory (splice is off, see SPLICE_CAPS), the bytes right
 * after the struct fuse_write_in it received, so the header sits just before `buf`.  The
 * kernel sets FUSE_WRITE_KILL_SUIDGID on direct (FOPEN_DIRECT_IO) writes by a process without
 * CAP_FSETID and leaves killing setuid/setgid to the server, since no file_remove_privs()
 * runs on that path.  The copy's own size and offset must match, else we report no flags. */
static unsigned write_flags_of(const char *buf, size_t size, off_t off)
{
    if (!conn_valid || conn_seen.proto_minor < 9)
        return 0;
    struct wire_write_in in;
    memcpy(&in, buf - sizeof(in), sizeof(in));
    if (in.size != size || (off_t)in.offset != off)
        return 0;
    return in.write_flags;
}

static void hook_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
                       off_t off, struct fuse_file_info *fi)
{
    int err = 0;
    size_t done = 0;
    unsigned wflags = write_flags_of(buf, size, off);
    PyGILState_STATE g = PyGILState_Ensure();
    /* zero-copy: the handler sees libfuse's request buffer and must not keep it */
    PyObject *mv = PyMemoryView_FromMemory((char *)buf, (Py_ssize_t)size, PyBUF_READ);
    PyObject *r = mv ? PyObject_CallFunction(h_write, "KLOI", (unsigned long long)fi->fh,
                                             (long long)off, mv, wflags) : NULL;
    if (r) {
        Py_ssize_t n = PyLong_AsSsize_t(r);
        Py_DECREF(r);
        if (!(n == -1 && PyErr_Occurred())) {
            if (n < 0 || (size_t)n > size)
                PyErr_Format(PyExc_ValueError, "write handler returned %zd for %zu bytes",
                             n, size);
            else
                done = (size_t)n;
        }
    }
    if (PyErr_Occurred())
        err = exception_errno("write");   /* clears the traceback that may hold mv */
    if (mv) {
        PyObject *rel = PyObject_CallMethod(mv, "release", NULL);
        if (!rel) {          /* still exported: a bug in the handler; never let it linger */
            log_exception("write (buffer kept past the request)");
            err = err ? err : EIO;
        }
        Py_XDECREF(rel);
        Py_DECREF(mv);
    }
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_write(req, done);
    fast_requests++;
    answered_sync = 1;
    drain();
    PyGILState_Release(g);
}

/* ------------------------------------------------------------------ */
/* init: pyfuse3's first, then our settings                            */

static unsigned clamp_u(long long want, unsigned limit)
{
    return (unsigned long long)want < limit ? (unsigned)want : limit;
}

static void hook_init(void *userdata, struct fuse_conn_info *conn)
{
    if (orig_init)
        orig_init(userdata, conn);

    /* libfuse already set max_readahead to what the kernel offered and
     * max_write to its buffer limit (1 MiB on 3.14): we may only lower them. */
    if (opt_max_readahead >= 0)
        conn->max_readahead = clamp_u(opt_max_readahead, conn->max_readahead);
    if (opt_max_write >= 4096)
        conn->max_write = clamp_u(opt_max_write, conn->max_write);
    if (opt_max_background >= 0)
        conn->max_background = clamp_u(opt_max_background, 65535);
    if (opt_congestion >= 0)
        conn->congestion_threshold = clamp_u(opt_congestion, 65535);
    if (opt_time_gran > 0)
        conn->time_gran = clamp_u(opt_time_gran, 1000000000u);

    /* Asking for something the kernel lacks makes libfuse abort the mount. */
    conn->want |= opt_want_on & conn->capable;
    conn->want &= ~opt_want_off;
    /* Splice would hand pyfuse3 fd-backed buffers and costs more than it
     * saves for our small in-memory copies: keep it off. */
    conn->want &= ~SPLICE_CAPS;

    conn_seen = *conn;
    conn_valid = 1;
    init_reply_pending = want_dio_mmap || want_killpriv_v2 || uring_wanted();  /* replies next */
}

/* ------------------------------------------------------------------ */
/* getxattr("security.capability") without Python                      */

/* Without FUSE_HANDLE_KILLPRIV_V2 (libfuse < 3.15 cannot ask for it) the
 * kernel's file_remove_privs() sends getxattr("security.capability") before
 * EVERY write: one extra round trip through the Python loop per write. When
 * Python says no inode has that xattr, answer ENODATA here, GIL untouched. */
static void (*orig_getxattr)(fuse_req_t, fuse_ino_t, const char *, size_t);
volatile int capability_xattrs = 1;         /* unknown until Python says */

static void hook_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    if (!capability_xattrs && strcmp(name, "security.capability") == 0) {
        fuse_reply_err(req, ENODATA);
        answered_sync = 1;
        return;
    }
    if (orig_getxattr)
        orig_getxattr(req, ino, name, size);
    else
        fuse_reply_err(req, ENOSYS);
}

/* ------------------------------------------------------------------ */
/* the interposed fuse_session_new                                     */

static const struct fuse_lowlevel_ops *patch_ops(const struct fuse_lowlevel_ops *op,
                                                 size_t *op_size)
{
    size_t n = *op_size < sizeof(ops_copy) ? *op_size : sizeof(ops_copy);
    memset(&ops_copy, 0, sizeof(ops_copy));
    memcpy(&ops_copy, op, n);

    struct fuse_lowlevel_ops *o = &ops_copy.ops;
    if (!o->copy_file_range)
        o->copy_file_range = hook_copy_file_range;
    if (!o->lseek)
        o->lseek = hook_lseek;
    if (!o->fallocate)
        o->fallocate = hook_fallocate;
    if (o->getxattr != hook_getxattr) {
        orig_getxattr = o->getxattr;
        o->getxattr = hook_getxattr;
    }
    if (o->setattr && o->setattr != hook_setattr) {
        orig_setattr = o->setattr;
        o->setattr = hook_setattr;
    }
    if (o->init != hook_init) {
        orig_init = o->init;
        o->init = hook_init;
    }
    /* the fast path is chosen once, when the session is made */
    if (h_read)
        o->read = hook_read;
    if (h_write) {
        o->write = hook_write;
        o->write_buf = NULL;    /* libfuse prefers write_buf when set */
    }
    /* A caller built against older headers passes a smaller op_size; ours
     * must cover the slots we just filled. */
    *op_size = n > sizeof(struct fuse_lowlevel_ops) ? n : sizeof(struct fuse_lowlevel_ops);
    return o;
}

/* ------------------------------------------------------------------ */
/* dax mode: mmap of direct-I/O files                                  */

/* With FOPEN_DIRECT_IO on every open (-o dax), the kernel refuses MAP_SHARED
 * mappings unless the server sets FUSE_DIRECT_IO_ALLOW_MMAP (kernel >= 6.6),
 * bit 36 of the INIT flags: flags2 bit 4.  libfuse 3.14 knows no such
 * capability and builds flags2 only from the bits it knows, so we pass the
 * session a custom writev (fuse_session_custom_io, libfuse >= 3.14) that adds
 * the bit to the one INIT reply; the flag is honoured only when the kernel
 * announced FUSE_INIT_EXT, as libfuse does for its own flags2 bits.
 * struct fuse_init_out: flags at byte 12, flags2 at byte 32. */
#define INIT_EXT_BIT        (1u << 30)
#define KILLPRIV_V2_BIT     (1u << 28)
#define DIO_ALLOW_MMAP_BIT2 (1u << 4)

#define OVER_IO_URING_BIT2  (1u << 9)

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    if (uring_reply(iov, count)) {             /* a request that came through a ring */
        ssize_t n = 0;
        for (int i = 0; i < count; i++)
            n += (ssize_t)iov[i].iov_len;
        return n;
    }
    int uring_sent = 0;
    if (init_reply_pending && count >= 2 && iov[1].iov_len >= 36) {
        init_reply_pending = 0;
        uint32_t flags, flags2;
        memcpy(&flags, (char *)iov[1].iov_base + 12, 4);
        memcpy(&flags2, (char *)iov[1].iov_base + 32, 4);
        if (want_dio_mmap && (flags & INIT_EXT_BIT)) {
            flags2 |= DIO_ALLOW_MMAP_BIT2;
            memcpy((char *)iov[1].iov_base + 32, &flags2, 4);
            dio_mmap_sent = 1;
        }
        if (want_killpriv_v2 && h_kill) {
            flags |= KILLPRIV_V2_BIT;
            memcpy((char *)iov[1].iov_base + 12, &flags, 4);
            killpriv_v2_sent = 1;
        }
        /* -o uring: only if the kernel offered it (_uring.c checks the INIT request) and the
         * rings and their threads are ready: from the reply on, requests wait for them */
        if ((flags & INIT_EXT_BIT) && uring_init_reply(iov[1].iov_base, iov[1].iov_len, fd)) {
            flags2 |= OVER_IO_URING_BIT2;
            memcpy((char *)iov[1].iov_base + 32, &flags2, 4);
            uring_sent = 1;
        }
    }
    ssize_t n = writev(fd, iov, count);
    if (uring_sent)
        uring_init_replied(n >= 0);
    return n;
}

static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
    return read(fd, buf, len);
}

static void install_custom_io(struct fuse_session *se)
{
    static const struct fuse_custom_io io = {.writev = io_writev, .read = io_read};
    /* custom_io wants an fd; fuse_session_mount() replaces it with /dev/fuse's
     * and keeps se->io, so a placeholder that we close at once will do. */
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    if (fuse_session_custom_io(se, &io, fd) != 0) {
        want_dio_mmap = want_killpriv_v2 = 0;
        uring_py_configure(NULL, Py_False);
    }
    close(fd);
}

static void note_session(struct fuse_session *se)
{
    session = se;
    dp_note_session(se);
    killpriv_v2_sent = dio_mmap_sent = 0;
    if (se && (want_dio_mmap || want_killpriv_v2 || uring_wanted()))
        install_custom_io(se);
    if (se && ops_copy.ops.copy_file_range && ops_copy.ops.lseek &&
        ops_copy.ops.fallocate)
        hooked = 1;
    conn_valid = 0;
}

struct fuse_session *hook_session_new(struct fuse_args *args,
                                      const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    if (!real_new) {
        errno = ENOSYS;
        return NULL;
    }
    if (in_hook || !op)
        return real_new(args, op, op_size, userdata);
    in_hook = 1;
    const struct fuse_lowlevel_ops *mine = patch_ops(op, &op_size);
    struct fuse_session *se = real_new(args, mine, op_size, userdata);
    in_hook = 0;
    note_session(se);
    return se;
}

struct fuse_session *hook_session_new_versioned(struct fuse_args *args,
                                                const struct fuse_lowlevel_ops *op,
                                                size_t op_size,
                                                struct libfuse_version *version,
                                                void *userdata)
{
    if (!real_new_v) {
        errno = ENOSYS;
        return NULL;
    }
    if (in_hook || !op)
        return real_new_v(args, op, op_size, version, userdata);
    in_hook = 1;
    const struct fuse_lowlevel_ops *mine = patch_ops(op, &op_size);
    struct fuse_session *se = real_new_v(args, mine, op_size, version, userdata);
    in_hook = 0;
    note_session(se);
    return se;
}

/* ------------------------------------------------------------------ */
/* Python API                                                          */

static int set_one(PyObject **slot, PyObject *v, const char *name)
{
    if (v != Py_None && !PyCallable_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s handler must be callable or None", name);
        return -1;
    }
    Py_XSETREF(*slot, v == Py_None ? NULL : Py_NewRef(v));
    return 0;
}

static PyObject *py_set_handlers(PyObject *self, PyObject *args)
{
    PyObject *cfr, *ls, *fa, *kp = Py_None;
    if (!PyArg_ParseTuple(args, "OOO|O", &cfr, &ls, &fa, &kp))
        return NULL;
    if (set_one(&h_cfr, cfr, "copy_file_range") || set_one(&h_lseek, ls, "lseek") ||
        set_one(&h_falloc, fa, "fallocate") || set_one(&h_kill, kp, "kill_privileges"))
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_set_fast_path(PyObject *self, PyObject *args)
{
    PyObject *rd, *wr;
    long spin_us;
    if (!PyArg_ParseTuple(args, "OOl", &rd, &wr, &spin_us))
        return NULL;
    if (spin_us < 0 || spin_us > 1000000) {
        PyErr_SetString(PyExc_ValueError, "spin_us must be in [0, 1000000]");
        return NULL;
    }
    if (set_one(&h_read, rd, "read") || set_one(&h_write, wr, "write"))
        return NULL;
    spin_ns = spin_us * 1000;
    Py_RETURN_NONE;
}

static PyObject *py_fast_stats(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("{s:K,s:K}", "fast_requests", fast_requests,
                         "drained_requests", drained_requests);
}

static PyObject *py_set_conn_options(PyObject *self, PyObject *args)
{
    long long ra, mw, mb, ct, tg;
    unsigned int on, off;
    if (!PyArg_ParseTuple(args, "LLLLLII", &ra, &mw, &mb, &ct, &tg, &on, &off))
        return NULL;
    opt_max_readahead = ra;
    opt_max_write = mw;
    opt_max_background = mb;
    opt_congestion = ct;
    opt_time_gran = tg;
    opt_want_on = on & ~SPLICE_CAPS;
    opt_want_off = off;
    Py_RETURN_NONE;
}

static PyObject *py_set_direct_io_mmap(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    want_dio_mmap = on;
    Py_RETURN_NONE;
}

static PyObject *py_direct_io_mmap_sent(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(dio_mmap_sent);
}

static PyObject *py_set_killpriv_v2(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    want_killpriv_v2 = on;
    Py_RETURN_NONE;
}

static PyObject *py_killpriv_v2_sent(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(killpriv_v2_sent);
}

static PyObject *py_set_capability_xattrs(PyObject *self, PyObject *arg)
{
    int v = PyObject_IsTrue(arg);
    if (v < 0)
        return NULL;
    capability_xattrs = v;
    Py_RETURN_NONE;
}

static PyObject *py_hooked(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(hooked);
}

static PyObject *py_conn_info(PyObject *self, PyObject *unused)
{
    if (!conn_valid)
        return PyDict_New();
    const struct fuse_conn_info *c = &conn_seen;
    return Py_BuildValue(
        "{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "proto_major", c->proto_major,
        "proto_minor", c->proto_minor, "max_write", c->max_write, "max_read",
        c->max_read, "max_readahead", c->max_readahead, "capable", c->capable,
        "want", c->want, "max_background", c->max_background,
        "congestion_threshold", c->congestion_threshold, "time_gran", c->time_gran);
}

static PyObject *py_paths(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("{s:s,s:s,s:O,s:O}", "self", self_path, "libfuse",
                         libfuse_path, "fuse_session_new@FUSE_3.0",
                         real_new ? Py_True : Py_False,
                         "fuse_session_new_versioned@FUSE_3.17",
                         real_new_v ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"_set_handlers", py_set_handlers, METH_VARARGS, NULL},
    {"_set_conn_options", py_set_conn_options, METH_VARARGS, NULL},
    {"_set_fast_path", py_set_fast_path, METH_VARARGS, NULL},
    {"fast_stats", py_fast_stats, METH_NOARGS, NULL},
    {"hooked", py_hooked, METH_NOARGS, NULL},
    {"set_capability_xattrs", py_set_capability_xattrs, METH_O, NULL},
    {"set_direct_io_mmap", py_set_direct_io_mmap, METH_O, NULL},
    {"direct_io_mmap_sent", py_direct_io_mmap_sent, METH_NOARGS, NULL},
    {"set_killpriv_v2", py_set_killpriv_v2, METH_O, NULL},
    {"killpriv_v2_sent", py_killpriv_v2_sent, METH_NOARGS, NULL},
    {"conn_info", py_conn_info, METH_NOARGS, NULL},
    {"_paths", py_paths, METH_NOARGS, NULL},
    {"_dp_configure", dp_py_configure, METH_VARARGS, NULL},
    {"dp_publish", dp_py_publish, METH_VARARGS, NULL},
    {"dp_revoke", dp_py_revoke, METH_O, NULL},
    {"dp_take_times", dp_py_take_times, METH_O, NULL},
    {"dp_take_all_times", dp_py_take_all_times, METH_NOARGS, NULL},
    {"dp_revoke_all", dp_py_revoke_all, METH_NOARGS, NULL},
    {"dp_stats", dp_py_stats, METH_NOARGS, NULL},
    {"dp_stop", dp_py_stop, METH_NOARGS, NULL},
    {"cow_configure", cow_py_configure, METH_VARARGS, NULL},
    {"cow_pool_add", cow_py_pool_add, METH_O, NULL},
    {"cow_pool_take", cow_py_pool_take, METH_NOARGS, NULL},
    {"cow_take", cow_py_take, METH_NOARGS, NULL},
    {"cow_applied", cow_py_applied, METH_O, NULL},
    {"cow_disable", cow_py_disable, METH_NOARGS, NULL},
    {"cow_status", cow_py_status, METH_NOARGS, NULL},
    {"_uring_configure", uring_py_configure, METH_O, NULL},
    {"uring_status", uring_py_status, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "daxfs._fusehook",
    .m_doc = "fuse_session_new interposer (use daxfs.fusehook)",
    .m_size = -1,
    .m_methods = methods,
};

/* Find the libfuse that we (and pyfuse3) were linked against via a symbol we
 * do not define ourselves, and fetch the real fuse_session_new from it.
 * RTLD_NEXT would search only objects loaded after us in *our* scope, which
 * does not reliably include libfuse. */
static int resolve_real(void)
{
    Dl_info info;
    if (!dladdr((void *)&fuse_reply_err, &info) || !info.dli_fname) {
        PyErr_SetString(PyExc_ImportError, "dladdr(fuse_reply_err) failed");
        return -1;
    }
    snprintf(libfuse_path, sizeof(libfuse_path), "%s", info.dli_fname);
    void *h = dlopen(libfuse_path, RTLD_NOW | RTLD_NOLOAD);
    if (!h) {
        PyErr_Format(PyExc_ImportError, "dlopen(%s): %s", libfuse_path, dlerror());
        return -1;
    }
    real_new = (new_fn)dlvsym(h, "fuse_session_new", "FUSE_3.0");
    real_new_v = (new_versioned_fn)dlvsym(h, "fuse_session_new_versioned", "FUSE_3.17");
    if ((void *)real_new == (void *)hook_session_new ||
        (void *)real_new_v == (void *)hook_session_new_versioned) {
        PyErr_SetString(PyExc_ImportError, "dlvsym found our own fuse_session_new");
        return -1;
    }
    if (!real_new && !real_new_v) {
        PyErr_Format(PyExc_ImportError, "no fuse_session_new in %s", libfuse_path);
        return -1;
    }
    if (dp_resolve(h) != 0) {
        PyErr_Format(PyExc_ImportError, "fuse_session_fd/receive_buf/destroy/exit@FUSE_3.0 "
                     "not found in %s", libfuse_path);
        return -1;
    }
    return 0;
}

/* Re-open ourselves with RTLD_GLOBAL: Python loaded us RTLD_LOCAL, which would
 * hide our fuse_session_new from extensions loaded later (pyfuse3).  The extra
 * reference is never dropped, so we also stay loaded for good. */
static int make_global(void)
{
    Dl_info info;
    if (!dladdr((void *)&hook_init, &info) || !info.dli_fname) {
        PyErr_SetString(PyExc_ImportError, "dladdr on own symbol failed");
        return -1;
    }
    snprintf(self_path, sizeof(self_path), "%s", info.dli_fname);
    if (!dlopen(self_path, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL)) {
        PyErr_Format(PyExc_ImportError, "dlopen(%s, RTLD_GLOBAL): %s", self_path,
                     dlerror());
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__fusehook(void)
{
    if (resolve_real() || make_global())
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m)
        return NULL;
#define ADD(name) PyModule_AddIntConstant(m, #name, name)
    if (ADD(FUSE_CAP_ASYNC_READ) || ADD(FUSE_CAP_POSIX_LOCKS) ||
        ADD(FUSE_CAP_ATOMIC_O_TRUNC) || ADD(FUSE_CAP_EXPORT_SUPPORT) ||
        ADD(FUSE_CAP_DONT_MASK) || ADD(FUSE_CAP_SPLICE_WRITE) ||
        ADD(FUSE_CAP_SPLICE_MOVE) || ADD(FUSE_CAP_SPLICE_READ) ||
        ADD(FUSE_CAP_FLOCK_LOCKS) || ADD(FUSE_CAP_IOCTL_DIR) ||
        ADD(FUSE_CAP_AUTO_INVAL_DATA) || ADD(FUSE_CAP_READDIRPLUS) ||
        ADD(FUSE_CAP_READDIRPLUS_AUTO) || ADD(FUSE_CAP_ASYNC_DIO) ||
        ADD(FUSE_CAP_WRITEBACK_CACHE) || ADD(FUSE_CAP_NO_OPEN_SUPPORT) ||
        ADD(FUSE_CAP_PARALLEL_DIROPS) || ADD(FUSE_CAP_POSIX_ACL) ||
        ADD(FUSE_CAP_HANDLE_KILLPRIV) || ADD(FUSE_CAP_CACHE_SYMLINKS) ||
        ADD(FUSE_CAP_NO_OPENDIR_SUPPORT) || ADD(FUSE_CAP_EXPLICIT_INVAL_DATA) ||
        PyModule_AddIntConstant(m, "FUSE_WRITE_CACHE", 1 << 0) ||
        PyModule_AddIntConstant(m, "FUSE_WRITE_KILL_SUIDGID", 1 << 2)) {
        Py_DECREF(m);
        return NULL;
    }
#undef ADD
    return m;
}
