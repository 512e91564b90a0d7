/* daxfs._fastmaps: what _fastmaps.c (leaf splices, journal encoding) shares with
 * _cowadopt.c (the batch that applies the C data plane's COW breaks). One extension module. */
#ifndef DAXFS_FASTMAPS_H
#define DAXFS_FASTMAPS_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

extern PyObject *dt_i64, *dt_u32;       /* numpy dtypes, from setup() */

/* Up to 4 buffers of one leaf, acquired together and released together. */
typedef struct {
    Py_buffer b[4];
    int n;
} Bufs;

void release(Bufs *bs);
/* Acquire objs[k] with item size sizes[k] (writable where asked); all of length *len. */
int acquire(Bufs *bs, PyObject **objs, const int *sizes, const int *writable, Py_ssize_t *len);
/* Four new arrays of length n (int64 where sizes[k] is 8, else uint32), in a tuple, their
   buffers acquired writable in `out`. */
PyObject *new_leaf(Py_ssize_t n, const int *sizes, Bufs *out);
/* First index whose value is > x (upper) or >= x (!upper), in a sorted i64 array. */
Py_ssize_t bound(const int64_t *v, Py_ssize_t m, int64_t x, int upper);

PyObject *cow_adopt(PyObject *self, PyObject *args);

#endif
