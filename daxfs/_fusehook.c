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
 * to us.  We copy the ops table, let _fuseops.c fill the slots it serves and
 * call the real libfuse function, which we look up by address (never by soname).
 *
 * This file is the interposer: the session, the INIT negotiation (our connection
 * settings, and the INIT reply's bits libfuse 3.14 cannot ask for, through a
 * custom writev) and the Python module.  The operations themselves, answered in
 * place by synchronous Python handlers, are in _fuseops.c; the C data plane's
 * threads in _dataplane.c.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_dataplane.h"

#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>

#include "_fusehook.h"

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

/* Connection settings requested from Python (-1 = leave alone). */
static long long opt_max_readahead = -1, opt_max_write = -1,
                 opt_max_background = -1, opt_congestion = -1,
                 opt_time_gran = -1;
static unsigned opt_want_on, opt_want_off;

/* Bits libfuse 3.14 cannot ask for, added to the INIT reply (see io_writev):
 * FUSE_DIRECT_IO_ALLOW_MMAP for dax mode, FUSE_HANDLE_KILLPRIV_V2 (see hook_setattr in
 * _fuseops.c). */
static int want_dio_mmap, want_killpriv_v2;
static int init_reply_pending;
static int dio_mmap_sent;
int killpriv_v2_sent;

/* What was negotiated, as handed back to libfuse at the end of init. */
static struct fuse_conn_info conn_seen;
static int conn_valid;

#define SPLICE_CAPS (FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE)

struct fuse_session *hook_session;
unsigned hook_proto_minor;

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
    hook_proto_minor = conn->proto_minor;
    init_reply_pending = want_dio_mmap || want_killpriv_v2 || uring_wanted();  /* replies next */
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
    ops_patch(o);
    if (o->init != hook_init) {
        orig_init = o->init;
        o->init = hook_init;
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
        if (want_killpriv_v2 && ops_kill_handler_set()) {
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
    hook_session = se;
    dp_note_session(se);
    killpriv_v2_sent = dio_mmap_sent = 0;
    if (se && (want_dio_mmap || want_killpriv_v2 || uring_wanted()))
        install_custom_io(se);
    if (se && ops_copy.ops.copy_file_range && ops_copy.ops.lseek &&
        ops_copy.ops.fallocate)
        hooked = 1;
    conn_valid = 0;
    hook_proto_minor = 0;
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
    {"_set_handlers", ops_py_set_handlers, METH_VARARGS, NULL},
    {"_set_conn_options", py_set_conn_options, METH_VARARGS, NULL},
    {"_set_fast_path", ops_py_set_fast_path, METH_VARARGS, NULL},
    {"fast_stats", ops_py_fast_stats, METH_NOARGS, NULL},
    {"hooked", py_hooked, METH_NOARGS, NULL},
    {"set_capability_xattrs", ops_py_set_capability_xattrs, METH_O, NULL},
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
