/*
 * daxfs._fastmaps -- the two leaf splices of a COW break and its journal encoding, in C.
 *
 * A COW break of one block changes two sorted numpy leaves: the inode's extent leaf
 * (extents.py: the extent holding the block splits, up to three pieces) and a frame-index leaf
 * (frames.py: the block is cut out of its alias runs). In numpy each costs a dozen calls
 * of ~1 us each (searches, masks, one concatenate per array); here each is one call that
 * scans the leaf (at most a few hundred entries) and copies it once.
 *
 * The arrays are read through the buffer protocol (no numpy headers at build time); new
 * arrays are made by calling numpy.empty, handed over once by setup(). Contracts, checked:
 * every array is 1-D, C-contiguous, of the item size its dtype says, and the parallel
 * arrays of one leaf have one length. Python fallbacks with the same results live in
 * extents.py and frames.py (used when this module is missing; the tests run both).
 *
 *   setup(empty, int64, uint32)
 *   extent_replace(lblk, pblk, length, slot, a, b, written) -> 4 new arrays
 *       the leaf with its entries [a, b) replaced by `written`, a sequence of (slot, lblk,
 *       pblk, length) tuples (RemapResult.written); the caller keeps the order sorted.
 *   journal_txn(records, magic, epoch, seq) -> bytes
 *       journal.py's transaction for [(offset, bytes)]: TXN_HEADER (magic, nrec, body
 *       length, crc32 as format.txn_crc, epoch, seq), then per record offset u64, length
 *       u32, pad u32 (little-endian), the bytes, zeros to a multiple of 8.
 *   frame_cut(pblks, ns, inos, lblks, first, maxend, a, want_ino, diag, leaf_max) -> list
 *       frames.py's index (its four lists of leaf arrays, the leaves' first pblk and bound
 *       on run ends): cut block a out of every run holding it (want_ino < 0), or out of
 *       want_ino's run on file diagonal lblk - pblk == diag. In each leaf that may hold a
 *       (the one it sorts into, and earlier ones whose bound reaches it) a piece before a
 *       shrinks in place and a piece after a goes where pblk a+1 sorts; a changed leaf of
 *       1..leaf_max runs replaces its list items (and its first). Returns [(leaf, arrays)]
 *       of changed leaves that became empty or over-full, highest leaf first, for Python.
 *   cow_adopt(...) -> (done, extents added, refs, shared, free deltas)
 *       the mapping half of the COW breaks of one file, in a loop (daxfs/_cowadopt.c).
 */
#include "_fastmaps.h"

static PyObject *np_empty;
PyObject *dt_i64, *dt_u32;

static PyObject *setup(PyObject *self, PyObject *args)
{
    PyObject *e, *a, *b;
    if (!PyArg_ParseTuple(args, "OOO", &e, &a, &b))
        return NULL;
    Py_XSETREF(np_empty, Py_NewRef(e));
    Py_XSETREF(dt_i64, Py_NewRef(a));
    Py_XSETREF(dt_u32, Py_NewRef(b));
    Py_RETURN_NONE;
}

void release(Bufs *bs)
{
    for (int k = 0; k < bs->n; k++)
        PyBuffer_Release(&bs->b[k]);
    bs->n = 0;
}

int acquire(Bufs *bs, PyObject **objs, const int *sizes, const int *writable,
            Py_ssize_t *len)
{
    bs->n = 0;
    for (int k = 0; k < 4; k++) {
        int flags = writable[k] ? PyBUF_CONTIG : PyBUF_CONTIG_RO;
        if (PyObject_GetBuffer(objs[k], &bs->b[k], flags | PyBUF_FORMAT) < 0) {
            release(bs);
            return -1;
        }
        bs->n++;
        Py_buffer *v = &bs->b[k];
        /* int64 is 'l' (or 'q'), uint32 'I' in the struct-module codes numpy exports */
        const char *f = v->format ? v->format + strlen(v->format) - 1 : "?";
        if (v->ndim != 1 || v->itemsize != sizes[k] || !strchr(sizes[k] == 8 ? "lq" : "I", *f) ||
            (k && v->shape[0] != bs->b[0].shape[0])) {
            release(bs);
            PyErr_SetString(PyExc_ValueError, "leaf arrays: wrong shape or dtype");
            return -1;
        }
    }
    *len = bs->b[0].shape[0];
    return 0;
}

static PyObject *empty(Py_ssize_t n, PyObject *dtype)
{
    if (!np_empty) {
        PyErr_SetString(PyExc_RuntimeError, "_fastmaps.setup() was not called");
        return NULL;
    }
    return PyObject_CallFunction(np_empty, "nO", n, dtype);
}

PyObject *new_leaf(Py_ssize_t n, const int *sizes, Bufs *out)
{
    PyObject *t = PyTuple_New(4);
    if (!t)
        return NULL;
    out->n = 0;
    for (int k = 0; k < 4; k++) {
        PyObject *arr = empty(n, sizes[k] == 8 ? dt_i64 : dt_u32);
        if (!arr)
            goto fail;
        PyTuple_SET_ITEM(t, k, arr);
        if (PyObject_GetBuffer(arr, &out->b[k], PyBUF_CONTIG) < 0)
            goto fail;
        out->n++;
    }
    return t;
fail:
    release(out);
    Py_DECREF(t);
    return NULL;
}

static PyObject *extent_replace(PyObject *self, PyObject *args)
{
    PyObject *objs[4], *written;
    Py_ssize_t a, b;
    if (!PyArg_ParseTuple(args, "OOOOnnO", &objs[0], &objs[1], &objs[2], &objs[3], &a, &b,
                          &written))
        return NULL;
    static const int sizes[4] = {8, 8, 4, 4}, ro[4] = {0, 0, 0, 0};
    PyObject *seq = PySequence_Fast(written, "extent_replace: entries must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(seq);
    PyObject **v = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < k; i++) {
        if (!PyTuple_Check(v[i]) || PyTuple_GET_SIZE(v[i]) != 4) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError,
                            "extent_replace: entries are (slot, lblk, pblk, length)");
            return NULL;
        }
    }
    Bufs in, out;
    Py_ssize_t m;
    if (acquire(&in, objs, sizes, ro, &m) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    PyObject *t = NULL;
    if (a < 0 || b < a || b > m) {
        PyErr_SetString(PyExc_ValueError, "extent_replace: bad range");
        goto done;
    }
    if (!(t = new_leaf(m - (b - a) + k, sizes, &out)))
        goto done;
    const int64_t *lb = in.b[0].buf, *pb = in.b[1].buf;
    const uint32_t *ln = in.b[2].buf, *sl = in.b[3].buf;
    int64_t *olb = out.b[0].buf, *opb = out.b[1].buf;
    uint32_t *oln = out.b[2].buf, *osl = out.b[3].buf;
    memcpy(olb, lb, a * 8);
    memcpy(opb, pb, a * 8);
    memcpy(oln, ln, a * 4);
    memcpy(osl, sl, a * 4);
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *e = v[i];
        osl[a + i] = (uint32_t)PyLong_AsUnsignedLongMask(PyTuple_GET_ITEM(e, 0));
        olb[a + i] = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 1));
        opb[a + i] = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 2));
        oln[a + i] = (uint32_t)PyLong_AsUnsignedLongMask(PyTuple_GET_ITEM(e, 3));
    }
    Py_ssize_t rest = m - b;
    memcpy(olb + a + k, lb + b, rest * 8);
    memcpy(opb + a + k, pb + b, rest * 8);
    memcpy(oln + a + k, ln + b, rest * 4);
    memcpy(osl + a + k, sl + b, rest * 4);
    release(&out);
    if (PyErr_Occurred())
        Py_CLEAR(t);
done:
    release(&in);
    Py_DECREF(seq);
    return t;
}

Py_ssize_t bound(const int64_t *v, Py_ssize_t m, int64_t x, int upper)
{
    Py_ssize_t lo = 0, hi = m;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (upper ? v[mid] <= x : v[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Cut block a out of one leaf (objs: pblk, n, ino, lblk). Returns -1 on error, 0 when no
   run held a, 1 when runs only shrank in place, 2 with the leaf's new arrays in *res. */
static int cut_leaf(PyObject **objs, long long a, long long want, long long diag,
                    PyObject **res)
{
    static const int sizes[4] = {8, 4, 4, 8}, rw[4] = {0, 1, 0, 0};
    Bufs in, out;
    Py_ssize_t m;
    if (acquire(&in, objs, sizes, rw, &m) < 0)
        return -1;
    const int64_t *p = in.b[0].buf, *lb = in.b[3].buf;
    uint32_t *n = in.b[1].buf;
    const uint32_t *ino = in.b[2].buf;
    Py_ssize_t j = bound(p, m, a, 1);                /* runs starting at or before a */
    Py_ssize_t hits = 0, drops = 0, tails = 0;
#define HIT(k) (p[k] + (int64_t)n[k] > a && \
                (want < 0 || (ino[k] == (uint32_t)want && lb[k] - p[k] == diag)))
    for (Py_ssize_t k = 0; k < j; k++) {
        if (HIT(k)) {
            hits++;
            drops += p[k] == a;
            tails += p[k] + (int64_t)n[k] > a + 1;
        }
    }
    if (!hits) {
        release(&in);
        return 0;
    }
    if (!drops && !tails) {                          /* runs ending at a+1: shrink them */
        for (Py_ssize_t k = 0; k < j; k++)
            if (HIT(k))
                n[k] = (uint32_t)(a - p[k]);
        release(&in);
        return 1;
    }
    Py_ssize_t jt = bound(p, m, a + 1, 0);           /* where pblk a+1 sorts; >= j */
    PyObject *t = new_leaf(m - drops + tails, sizes, &out);
    if (!t) {
        release(&in);
        return -1;
    }
    int64_t *op = out.b[0].buf, *olb = out.b[3].buf;
    uint32_t *on = out.b[1].buf, *oino = out.b[2].buf;
    Py_ssize_t w = 0;
    for (Py_ssize_t k = 0; k < jt; k++) {            /* heads in place, drops skipped */
        int hit = k < j && HIT(k);
        if (hit && p[k] == a)
            continue;
        op[w] = p[k], on[w] = hit ? (uint32_t)(a - p[k]) : n[k], oino[w] = ino[k];
        olb[w++] = lb[k];
    }
    for (Py_ssize_t k = 0; k < j; k++) {             /* tails, in the order of their runs */
        if (HIT(k) && p[k] + (int64_t)n[k] > a + 1) {
            op[w] = a + 1, on[w] = (uint32_t)(p[k] + n[k] - a - 1), oino[w] = ino[k];
            olb[w++] = lb[k] + a + 1 - p[k];
        }
    }
#undef HIT
    Py_ssize_t rest = m - jt;
    memcpy(op + w, p + jt, rest * 8);
    memcpy(on + w, n + jt, rest * 4);
    memcpy(oino + w, ino + jt, rest * 4);
    memcpy(olb + w, lb + jt, rest * 8);
    release(&out);
    release(&in);
    *res = t;
    return 2;
}

static PyObject *frame_cut(PyObject *self, PyObject *args)
{
    PyObject *lists[4], *first, *maxend;
    long long a, want, diag;
    Py_ssize_t leaf_max;
    if (!PyArg_ParseTuple(args, "O!O!O!O!OOLLLn", &PyList_Type, &lists[0], &PyList_Type,
                          &lists[1], &PyList_Type, &lists[2], &PyList_Type, &lists[3], &first,
                          &maxend, &a, &want, &diag, &leaf_max))
        return NULL;
    Py_buffer fb, mb;
    if (PyObject_GetBuffer(first, &fb, PyBUF_CONTIG | PyBUF_FORMAT) < 0)
        return NULL;
    if (PyObject_GetBuffer(maxend, &mb, PyBUF_CONTIG_RO | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&fb);
        return NULL;
    }
    PyObject *pending = PyList_New(0);
    Py_ssize_t nl = PyList_GET_SIZE(lists[0]);
    if (!pending)
        goto done;
    if (fb.itemsize != 8 || mb.itemsize != 8 || fb.len / 8 != nl || mb.len / 8 != nl ||
        PyList_GET_SIZE(lists[1]) != nl || PyList_GET_SIZE(lists[2]) != nl ||
        PyList_GET_SIZE(lists[3]) != nl) {
        PyErr_SetString(PyExc_ValueError, "frame_cut: leaf lists and bounds disagree");
        Py_CLEAR(pending);
        goto done;
    }
    int64_t *fst = fb.buf;
    const int64_t *mx = mb.buf;
    Py_ssize_t li0 = bound(fst, nl, a, 1) - 1;
    /* leaves up to li0 whose runs may reach a: a long run can start leaves before it */
    int scan = li0 > 0 && mx[li0 - 1] > a;
    for (Py_ssize_t li = li0; li >= 0; li--) {
        if (li != li0 && (!scan || mx[li] <= a))
            continue;
        PyObject *objs[4], *t = NULL;
        for (int k = 0; k < 4; k++)
            objs[k] = PyList_GET_ITEM(lists[k], li);
        int r = cut_leaf(objs, a, want, diag, &t);
        if (r < 0) {
            Py_CLEAR(pending);
            goto done;
        }
        if (r < 2)
            continue;
        Py_ssize_t size = PyTuple_GET_SIZE(t) ? PyObject_Length(PyTuple_GET_ITEM(t, 0)) : 0;
        if (size > 0 && size <= leaf_max) {          /* the leaf stays one leaf: swap it in */
            Py_buffer nb;
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(t, 0), &nb, PyBUF_CONTIG_RO) < 0) {
                Py_DECREF(t);
                Py_CLEAR(pending);
                goto done;
            }
            fst[li] = ((const int64_t *)nb.buf)[0];
            PyBuffer_Release(&nb);
            for (int k = 0; k < 4; k++)
                PyList_SetItem(lists[k], li, Py_NewRef(PyTuple_GET_ITEM(t, k)));
            Py_DECREF(t);
            continue;
        }
        PyObject *item = Py_BuildValue("(nN)", li, t);   /* empty or over-full: Python's */
        if (!item || PyList_Append(pending, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(pending);
            goto done;
        }
        Py_DECREF(item);
    }
done:
    PyBuffer_Release(&mb);
    PyBuffer_Release(&fb);
    return pending;
}

static void put_le(unsigned char *d, uint64_t v, int n)
{
    for (int k = 0; k < n; k++)
        d[k] = (unsigned char)(v >> (8 * k));
}

/* CRC-32 (IEEE, reflected 0xEDB88320), as zlib.crc32: crc32(data, crc32(head)). */
static uint32_t crc_table[256];

static uint32_t crc32_update(uint32_t crc, const unsigned char *d, Py_ssize_t n)
{
    if (!crc_table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++)
                c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            crc_table[i] = c;
        }
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *d++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* The body of `arg` ([(offset, bytes)]) after `head` zero bytes left for the caller. */
static PyObject *encode(PyObject *arg, Py_ssize_t head)
{
    PyObject *seq = PySequence_Fast(arg, "journal: a sequence of (offset, bytes) records");
    if (!seq)
        return NULL;
    Py_ssize_t nrec = PySequence_Fast_GET_SIZE(seq), got = 0, total = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_buffer *bufs = PyMem_Calloc(nrec ? nrec : 1, sizeof(Py_buffer));
    unsigned long long *offs = PyMem_Calloc(nrec ? nrec : 1, sizeof(unsigned long long));
    PyObject *out = NULL;
    if (!bufs || !offs) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < nrec; got++) {
        PyObject *it = items[got];
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 2) {
            PyErr_SetString(PyExc_TypeError, "journal_txn: records are (offset, bytes)");
            goto done;
        }
        offs[got] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(it, 0));
        if (PyErr_Occurred())
            goto done;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(it, 1), &bufs[got], PyBUF_SIMPLE) < 0)
            goto done;
        if (bufs[got].len > UINT32_MAX) {
            got++;
            PyErr_SetString(PyExc_ValueError, "journal_txn: record over 4 GiB");
            goto done;
        }
        total += 16 + ((bufs[got].len + 7) & ~(Py_ssize_t)7);
    }
    out = PyBytes_FromStringAndSize(NULL, head + total);
    if (!out)
        goto done;
    unsigned char *d = (unsigned char *)PyBytes_AS_STRING(out) + head;
    for (Py_ssize_t k = 0; k < nrec; k++) {
        Py_ssize_t len = bufs[k].len, pad = ((len + 7) & ~(Py_ssize_t)7) - len;
        put_le(d, offs[k], 8);
        put_le(d + 8, (uint64_t)len, 4);
        put_le(d + 12, 0, 4);
        memcpy(d + 16, bufs[k].buf, len);
        memset(d + 16 + len, 0, pad);
        d += 16 + len + pad;
    }
done:
    for (Py_ssize_t k = 0; k < got; k++)
        PyBuffer_Release(&bufs[k]);
    PyMem_Free(bufs);
    PyMem_Free(offs);
    Py_DECREF(seq);
    return out;
}

static PyObject *journal_txn(PyObject *self, PyObject *args)
{
    PyObject *recs;
    unsigned int magic;
    unsigned long long epoch, seq;
    if (!PyArg_ParseTuple(args, "OIKK", &recs, &magic, &epoch, &seq))
        return NULL;
    PyObject *out = encode(recs, 32);
    if (!out)
        return NULL;
    unsigned char *d = (unsigned char *)PyBytes_AS_STRING(out), f[20];
    Py_ssize_t body = PyBytes_GET_SIZE(out) - 32, nrec = PyObject_Length(recs);
    put_le(f, (uint64_t)nrec, 4);                    /* what the crc covers first: <IQQ */
    put_le(f + 4, epoch, 8);
    put_le(f + 12, seq, 8);
    uint32_t crc = crc32_update(crc32_update(0, f, 20), d + 32, body);
    put_le(d, magic, 4);                             /* TXN_HEADER: <IIIIQQ */
    put_le(d + 4, (uint64_t)nrec, 4);
    put_le(d + 8, (uint64_t)body, 4);
    put_le(d + 12, crc, 4);
    put_le(d + 16, epoch, 8);
    put_le(d + 24, seq, 8);
    return out;
}

static PyMethodDef methods[] = {
    {"journal_txn", journal_txn, METH_VARARGS,
     "journal_txn(records, magic, epoch, seq): TXN_HEADER + body, crc included"},
    {"setup", setup, METH_VARARGS, "setup(numpy.empty, int64 dtype, uint32 dtype)"},
    {"extent_replace", extent_replace, METH_VARARGS, "replace entries [a, b) of a leaf"},
    {"frame_cut", frame_cut, METH_VARARGS, "cut one block out of a frame-index leaf"},
    {"cow_adopt", cow_adopt, METH_VARARGS, "apply the C data plane's COW breaks of one file"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "daxfs._fastmaps",
    "The leaf splices of a COW break (extent split, frame-index cut) in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastmaps(void)
{
    return PyModule_Create(&module);
}
