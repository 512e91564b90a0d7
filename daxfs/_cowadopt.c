/*
 * daxfs._fastmaps.cow_adopt -- the mapping half of the C data plane's COW breaks, many at once.
 *
 * Why. The data plane's threads break the sharing of a block themselves (_cowplane.c) and
 * leave a record (ino, file block l, new block q, old block p) in the COW ring; the engine
 * then applies each record to its own tables (cowlog.py). In Python one record costs ~17 us
 * (find, split the extent, three extent records, frame-index cut, decref), spread over some
 * thirty small calls, and the COW storm ran at the pace of that loop. Here one call applies
 * a run of records of one file, doing exactly what BufCache.adopt_break does for the common
 * case, and stops at the first record that is not that case, for Python to do.
 *
 * The common case (extents.py ExtentMap._split_inside): file block l lies inside one extent
 * of its leaf, mapped to p; it becomes up to three pieces (head [s, l) keeps the slot, the
 * new block q takes the next, the tail [l+1, e) one more), the leaf does not overflow, and
 * q cannot merge with the extent after it. Anything else -- a hole, another old block, a
 * merge, a full leaf, no free extent slot -- stops the loop: `done` tells Python where.
 *
 * Per record, in Python's order (so the tables come out identical, which the tests check):
 * slots taken from the extent SlotPool's stack, the leaf replaced by a new extents.Leaf, its entry
 * in `firsts`, one extent record per piece into the transaction's writes {offset: bytes};
 * the new block's count of 1 and the old block's decrement marked dirty, the old block's
 * aliases cut (`cut`, FrameIndex.cut_block: all of them when one owner is left), a freed
 * old block quarantined. Counters the caller owns come back as deltas.
 *
 *   cow_adopt(leaves, firsts, ls, qs, ps, slot_pool, writes, ext_base, ino, rc, cut,
 *             leaf_cls, leaf_max, dirty, quarantine)
 *       -> (done, extents_added, refs_delta, shared_delta, free_delta)
 *   leaves/firsts: ExtentMap's; ls/qs/ps: int64 arrays of the records (file order of
 *   application); slot_pool: the extent SlotPool (its `arr` stack and `top`); writes: the
 *   transaction's dict; ext_base: byte offset of the extent table; rc: the refcount mirror
 *   (uint32, written); dirty/quarantine: BlockAllocator's lists.
 */
#include "_fastmaps.h"

#define EXTENT_RECORD 24            /* format.EXTENT_DTYPE: ino u4, length u4, lblk u8, pblk u8 */

static PyObject *s_lblk, *s_pblk, *s_length, *s_slot, *s_arr, *s_top;

static int names(void)
{
    if (s_top)
        return 0;
    s_lblk = PyUnicode_InternFromString("lblk");
    s_pblk = PyUnicode_InternFromString("pblk");
    s_length = PyUnicode_InternFromString("length");
    s_slot = PyUnicode_InternFromString("slot");
    s_arr = PyUnicode_InternFromString("arr");
    s_top = PyUnicode_InternFromString("top");
    return s_lblk && s_pblk && s_length && s_slot && s_arr && s_top ? 0 : -1;
}

/* bisect.bisect_right(firsts, x) - 1, at least 0 (ExtentMap._leaf_of). */
static Py_ssize_t leaf_of(PyObject *firsts, int64_t x, int *err)
{
    Py_ssize_t lo = 0, hi = PyList_GET_SIZE(firsts);
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        long long v = PyLong_AsLongLong(PyList_GET_ITEM(firsts, mid));
        if (v == -1 && PyErr_Occurred()) {
            *err = 1;
            return 0;
        }
        if (v <= x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > 1 ? lo - 1 : 0;
}

static int put_record(PyObject *writes, long long base, uint32_t slot, uint32_t ino,
                      int64_t lblk, int64_t pblk, uint32_t len)
{
    unsigned char r[EXTENT_RECORD];
    uint64_t l = (uint64_t)lblk, p = (uint64_t)pblk;
    for (int k = 0; k < 4; k++) {
        r[k] = (unsigned char)(ino >> (8 * k));
        r[4 + k] = (unsigned char)(len >> (8 * k));
    }
    for (int k = 0; k < 8; k++) {
        r[8 + k] = (unsigned char)(l >> (8 * k));
        r[16 + k] = (unsigned char)(p >> (8 * k));
    }
    PyObject *key = PyLong_FromLongLong(base + (long long)slot * EXTENT_RECORD);
    PyObject *val = PyBytes_FromStringAndSize((const char *)r, EXTENT_RECORD);
    int rc = key && val ? PyDict_SetItem(writes, key, val) : -1;
    Py_XDECREF(key);
    Py_XDECREF(val);
    return rc;
}

static int mark(PyObject *list, int64_t b)
{
    PyObject *t = Py_BuildValue("(LL)", (long long)b, (long long)b + 1);
    int rc = t ? PyList_Append(list, t) : -1;
    Py_XDECREF(t);
    return rc;
}

/* One record. 1: applied; 0: not the common case (nothing changed); -1: error. */
static int adopt_one(PyObject *leaves, PyObject *firsts, int64_t l, int64_t q, int64_t p,
                     int64_t *stack, Py_ssize_t *top, PyObject *writes, long long ext_base,
                     uint32_t ino, PyObject *leaf_cls, Py_ssize_t leaf_max, Py_ssize_t *added)
{
    static const int sizes[4] = {8, 8, 4, 4}, ro[4] = {0, 0, 0, 0};
    int err = 0;
    Py_ssize_t nl = PyList_GET_SIZE(leaves);
    if (!nl)
        return 0;
    Py_ssize_t li = leaf_of(firsts, l, &err);
    if (err)
        return -1;
    PyObject *leaf = PyList_GET_ITEM(leaves, li), *objs[4] = {NULL, NULL, NULL, NULL};
    PyObject *attr[4] = {s_lblk, s_pblk, s_length, s_slot};
    int res = -1;
    Bufs in = {.n = 0}, out = {.n = 0};
    PyObject *arrays = NULL;
    for (int k = 0; k < 4; k++)
        if (!(objs[k] = PyObject_GetAttr(leaf, attr[k])))
            goto done;
    Py_ssize_t m;
    if (acquire(&in, objs, sizes, ro, &m) < 0)
        goto done;
    const int64_t *lb = in.b[0].buf, *pb = in.b[1].buf;
    const uint32_t *ln = in.b[2].buf, *sl = in.b[3].buf;
    Py_ssize_t a = bound(lb, m, l, 1) - 1;
    res = 0;
    if (a < 0)
        goto done;
    int64_t s = lb[a], e = s + (int64_t)ln[a];
    if (!(s <= l && l < e) || pb[a] + (l - s) != p)
        goto done;                                   /* a hole, or another block: Python's */
    if (e == l + 1) {                                /* the next extent may continue q */
        if (a + 1 < m) {
            if (lb[a + 1] == l + 1 && pb[a + 1] == q + 1)
                goto done;
        } else if (li + 1 < nl) {
            long long f = PyLong_AsLongLong(PyList_GET_ITEM(firsts, li + 1));
            if (f == -1 && PyErr_Occurred()) {
                res = -1;
                goto done;
            }
            if (f == l + 1)
                goto done;
        }
    }
    int head = s < l, tail = l + 1 < e;
    Py_ssize_t pieces = 1 + head + tail, need = head + tail;
    if (m - 1 + pieces > leaf_max || *top < need)
        goto done;                                   /* the leaf splits, or no slot: Python's */
    uint32_t ws[3];
    int64_t wl[3], wp[3];
    uint32_t wn[3];
    int w = 0;
    if (head)
        ws[w] = sl[a], wl[w] = s, wp[w] = pb[a], wn[w++] = (uint32_t)(l - s);
    ws[w] = head ? (uint32_t)stack[--*top] : sl[a], wl[w] = l, wp[w] = q, wn[w++] = 1;
    if (tail)
        ws[w] = (uint32_t)stack[--*top], wl[w] = l + 1, wp[w] = p + 1,
        wn[w++] = (uint32_t)(e - l - 1);
    res = -1;
    if (!(arrays = new_leaf(m - 1 + pieces, sizes, &out)))
        goto done;
    int64_t *olb = out.b[0].buf, *opb = out.b[1].buf;
    uint32_t *oln = out.b[2].buf, *osl = out.b[3].buf;
    memcpy(olb, lb, a * 8), memcpy(opb, pb, a * 8), memcpy(oln, ln, a * 4), memcpy(osl, sl, a * 4);
    for (int k = 0; k < w; k++)
        olb[a + k] = wl[k], opb[a + k] = wp[k], oln[a + k] = wn[k], osl[a + k] = ws[k];
    Py_ssize_t rest = m - a - 1;
    memcpy(olb + a + w, lb + a + 1, rest * 8), memcpy(opb + a + w, pb + a + 1, rest * 8);
    memcpy(oln + a + w, ln + a + 1, rest * 4), memcpy(osl + a + w, sl + a + 1, rest * 4);
    int64_t first = olb[0];
    release(&out);
    PyObject *nleaf = PyObject_CallObject(leaf_cls, arrays);
    if (!nleaf)
        goto done;
    PyObject *nfirst = PyLong_FromLongLong(first);
    if (!nfirst) {
        Py_DECREF(nleaf);
        goto done;
    }
    PyList_SetItem(leaves, li, nleaf);               /* steals both */
    PyList_SetItem(firsts, li, nfirst);
    for (int k = 0; k < w; k++)
        if (put_record(writes, ext_base, ws[k], ino, wl[k], wp[k], wn[k]) < 0)
            goto done;
    *added += pieces - 1;
    res = 1;
done:
    release(&out);
    release(&in);
    Py_XDECREF(arrays);
    for (int k = 0; k < 4; k++)
        Py_XDECREF(objs[k]);
    return res;
}

PyObject *cow_adopt(PyObject *self, PyObject *args)
{
    PyObject *leaves, *firsts, *ls_o, *qs_o, *ps_o, *pool, *writes, *rc_o, *cut, *leaf_cls;
    PyObject *dirty, *quarantine;
    long long ext_base;
    unsigned int ino;
    Py_ssize_t leaf_max;
    if (!PyArg_ParseTuple(args, "O!O!OOOOO!LIOOOnO!O!", &PyList_Type, &leaves, &PyList_Type,
                          &firsts, &ls_o, &qs_o, &ps_o, &pool, &PyDict_Type, &writes,
                          &ext_base, &ino, &rc_o, &cut, &leaf_cls, &leaf_max, &PyList_Type,
                          &dirty, &PyList_Type, &quarantine))
        return NULL;
    if (names() < 0)
        return NULL;
    if (PyList_GET_SIZE(leaves) != PyList_GET_SIZE(firsts)) {
        PyErr_SetString(PyExc_ValueError, "cow_adopt: leaves and firsts disagree");
        return NULL;
    }
    PyObject *stack_o = PyObject_GetAttr(pool, s_arr), *top_o = PyObject_GetAttr(pool, s_top);
    Py_buffer rec[3], stk, rcb;
    int have = 0, stk_ok = 0, rc_ok = 0;
    PyObject *result = NULL;
    Py_ssize_t done = 0, added = 0, top = 0;
    long long refs = 0, shared = 0, freed = 0;
    if (!stack_o || !top_o)
        goto out;
    top = PyLong_AsSsize_t(top_o);
    if (top == -1 && PyErr_Occurred())
        goto out;
    PyObject *recs[3] = {ls_o, qs_o, ps_o};
    for (; have < 3; have++) {
        if (PyObject_GetBuffer(recs[have], &rec[have], PyBUF_CONTIG_RO) < 0)
            goto out;
        if (rec[have].itemsize != 8 || rec[have].len != rec[0].len) {
            have++;
            PyErr_SetString(PyExc_ValueError, "cow_adopt: records are three int64 arrays");
            goto out;
        }
    }
    if (PyObject_GetBuffer(stack_o, &stk, PyBUF_CONTIG_RO) < 0)
        goto out;
    stk_ok = 1;
    if (PyObject_GetBuffer(rc_o, &rcb, PyBUF_CONTIG) < 0)
        goto out;
    rc_ok = 1;
    if (stk.itemsize != 8 || top < 0 || top > stk.len / 8 || rcb.itemsize != 4) {
        PyErr_SetString(PyExc_ValueError, "cow_adopt: slot stack or refcounts of a wrong type");
        goto out;
    }
    const int64_t *ls = rec[0].buf, *qs = rec[1].buf, *ps = rec[2].buf;
    int64_t *stack = stk.buf;
    uint32_t *rc = rcb.buf;
    Py_ssize_t n = rec[0].len / 8, nrc = rcb.len / 4;
    for (; done < n; done++) {
        int64_t l = ls[done], q = qs[done], p = ps[done];
        if (p < 0 || p >= nrc || q < 0 || q >= nrc || rc[p] == 0)
            break;
        int r = adopt_one(leaves, firsts, l, q, p, stack, &top, writes, ext_base, ino,
                          leaf_cls, leaf_max, &added);
        if (r < 0)
            goto out;
        if (r == 0)
            break;
        /* the new block's count of 1 joins the transaction (BlockAllocator.pool_used) */
        if (mark(dirty, q) < 0)
            goto out;
        /* the old block loses this owner (BufCache._unmap, ln == 1; BlockAllocator.decref) */
        uint32_t was = rc[p];
        PyObject *cr = was == 2 ? PyObject_CallFunction(cut, "L", (long long)p) :
                       was > 2 ? PyObject_CallFunction(cut, "LLL", (long long)p, (long long)ino,
                                                      (long long)(l - p)) : Py_NewRef(Py_None);
        if (!cr)
            goto out;
        Py_DECREF(cr);
        if (mark(dirty, p) < 0)
            goto out;
        refs--;
        rc[p] = was - 1;
        if (was == 2)
            shared--;
        if (was == 1) {
            if (mark(quarantine, p) < 0)
                goto out;
            freed++;
        }
    }
    result = Py_BuildValue("(nnLLL)", done, added, refs, shared, freed);
out:
    if (stk_ok) {                           /* the slots taken stay taken, even on an error */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyObject *t = PyLong_FromSsize_t(top);
        if (!t || PyObject_SetAttr(pool, s_top, t) < 0)
            Py_CLEAR(result);
        Py_XDECREF(t);
        if (et)
            PyErr_Restore(et, ev, tb);
    }
    for (int k = 0; k < have; k++)
        PyBuffer_Release(&rec[k]);
    if (stk_ok)
        PyBuffer_Release(&stk);
    if (rc_ok)
        PyBuffer_Release(&rcb);
    Py_XDECREF(stack_o);
    Py_XDECREF(top_o);
    return result;
}
