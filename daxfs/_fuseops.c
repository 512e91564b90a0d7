/*
 * daxfs._fusehook, the operations answered in place (_fusehook.c is the
 * interposer that puts them into pyfuse3's ops table).
 *
 * copy_file_range, lseek and fallocate fill slots pyfuse3 3.5 leaves empty;
 * setattr and getxattr are wrapped (setuid/capability clearing under
 * FUSE_HANDLE_KILLPRIV_V2, the capability getxattr without Python); read and
 * write are the fast path.  Each calls a synchronous Python handler and replies
 * before it returns.  pyfuse3 calls fuse_session_process_buf() with the GIL
 * held, but PyGILState_Ensure() is used so the callbacks stay correct if that
 * ever changes.
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

#include "_fusehook.h"

#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>
#include <unistd.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Python handlers (strong refs, protected by the GIL). */
static PyObject *h_cfr, *h_lseek, *h_falloc;
static PyObject *h_kill;                /* kill_privileges(ino, suidgid), see hook_setattr */
static PyObject *h_read, *h_write;      /* fast path; NULL: pyfuse3 serves them */

/* the drain after a synchronously answered request */
#define DRAIN_MAX 256
static long spin_ns;                    /* 0: no drain */
static int draining;
static int answered_sync;               /* set by every callback that replied in place */
static struct fuse_buf drain_buf;
static unsigned long long fast_requests, drained_requests;

/* pyfuse3's own callbacks, called after ours (see ops_patch) */
static void (*orig_setattr)(fuse_req_t, fuse_ino_t, struct stat *, int,
                            struct fuse_file_info *);
static void (*orig_getxattr)(fuse_req_t, fuse_ino_t, const char *, size_t);

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
    if (draining || spin_ns <= 0 || !hook_session)
        return;
    /* With the data plane running, fuse_session_fd() and fuse_session_receive_buf() are
     * its queue of the requests its threads leave to Python (_dataplane.c): the same loop
     * then drains that queue. */
    draining = 1;
    struct pollfd pfd = {.fd = fuse_session_fd(hook_session), .events = POLLIN};
    long long deadline = mono_ns() + spin_ns;
    for (int n = 0; n < DRAIN_MAX && !fuse_session_exited(hook_session);) {
        int r = poll(&pfd, 1, 0);
        if (r <= 0 || !(pfd.revents & POLLIN)) {
            if (r < 0 || pfd.revents || mono_ns() > deadline)
                break;
            continue;
        }
        int res = fuse_session_receive_buf(hook_session, &drain_buf);
        if (res == -EINTR || res == -EAGAIN)
            continue;
        if (res <= 0)
            break;
        answered_sync = 0;
        fuse_session_process_buf(hook_session, &drain_buf);
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
    if (hook_proto_minor < 9)
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
/* getxattr("security.capability") without Python                      */

/* Without FUSE_HANDLE_KILLPRIV_V2 (libfuse < 3.15 cannot ask for it) the
 * kernel's file_remove_privs() sends getxattr("security.capability") before
 * EVERY write: one extra round trip through the Python loop per write. When
 * Python says no inode has that xattr, answer ENODATA here, GIL untouched. */
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
/* into the ops table                                                  */

/* Fill the slots pyfuse3 left empty, wrap setattr and getxattr, and take read
 * and write when Python registered fast-path handlers (chosen once, when the
 * session is made).  `o` is _fusehook.c's copy of pyfuse3's table. */
void ops_patch(struct fuse_lowlevel_ops *o)
{
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
    if (h_read)
        o->read = hook_read;
    if (h_write) {
        o->write = hook_write;
        o->write_buf = NULL;    /* libfuse prefers write_buf when set */
    }
}

int ops_kill_handler_set(void)
{
    return h_kill != NULL;
}

/* ------------------------------------------------------------------ */
/* Python API (daxfs.fusehook)                                         */

static int set_one(PyObject **slot, PyObject *v, const char *name)
{
    if (v != Py_None && !PyCallable_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s handler must be callable or None", name);
        return -1;
    }
    Py_XSETREF(*slot, v == Py_None ? NULL : Py_NewRef(v));
    return 0;
}

PyObject *ops_py_set_handlers(PyObject *self, PyObject *args)
{
    PyObject *cfr, *ls, *fa, *kp = Py_None;
    if (!PyArg_ParseTuple(args, "OOO|O", &cfr, &ls, &fa, &kp))
        return NULL;
    if (set_one(&h_cfr, cfr, "copy_file_range") || set_one(&h_lseek, ls, "lseek") ||
        set_one(&h_falloc, fa, "fallocate") || set_one(&h_kill, kp, "kill_privileges"))
        return NULL;
    Py_RETURN_NONE;
}

PyObject *ops_py_set_fast_path(PyObject *self, PyObject *args)
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

PyObject *ops_py_fast_stats(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("{s:K,s:K}", "fast_requests", fast_requests,
                         "drained_requests", drained_requests);
}

PyObject *ops_py_set_capability_xattrs(PyObject *self, PyObject *arg)
{
    int v = PyObject_IsTrue(arg);
    if (v < 0)
        return NULL;
    capability_xattrs = v;
    Py_RETURN_NONE;
}
