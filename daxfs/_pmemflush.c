/*
 * daxfs._pmemflush -- cache-line flushes and store fences for a DAX mapping.
 *
 * On a MAP_SYNC mapping of persistent memory, a store is durable once its
 * cache line has been written back from the CPU caches and a fence has
 * ordered that write-back before later stores: CLWB (or CLFLUSHOPT, or
 * CLFLUSH on old CPUs) for every 64-byte line of a range, then SFENCE.
 * This is what libpmem's pmem_persist does; daxfs uses libpmem when it is
 * installed and these otherwise.  Everywhere but x86-64 the calls report
 * that they are unavailable and daxfs keeps msync.
 *
 * flush(addr, length) writes back the lines of [addr, addr+length) (no
 * fence: CLWB/CLFLUSHOPT are weakly ordered); sfence() orders them;
 * counters() tells tests how many lines and fences were issued.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static unsigned long long lines_flushed, fences;
static int method;          /* 0 unknown, 1 clwb, 2 clflushopt, 3 clflush, -1 none */

#if defined(__x86_64__)
#include <cpuid.h>

static void detect(void)
{
    unsigned a, b, c, d;
    method = 3;                                     /* CLFLUSH: SSE2, always there */
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        if (b & (1u << 24))
            method = 1;                             /* CLWB */
        else if (b & (1u << 23))
            method = 2;                             /* CLFLUSHOPT */
    }
}

static void flush_line(char *p)
{
    switch (method) {
    case 1: __asm__ volatile("clwb %0" : "+m"(*(volatile char *)p)); break;
    case 2: __asm__ volatile("clflushopt %0" : "+m"(*(volatile char *)p)); break;
    default: __asm__ volatile("clflush %0" : "+m"(*(volatile char *)p)); break;
    }
}

static void store_fence(void)
{
    __asm__ volatile("sfence" ::: "memory");
}
#else
static void detect(void) { method = -1; }
static void flush_line(char *p) { (void)p; }
static void store_fence(void) { }
#endif

static PyObject *py_flush(PyObject *self, PyObject *args)
{
    unsigned long long addr, length;
    if (!PyArg_ParseTuple(args, "KK", &addr, &length))
        return NULL;
    if (method < 0) {
        PyErr_SetString(PyExc_OSError, "no cache-line flush on this CPU");
        return NULL;
    }
    uintptr_t p = (uintptr_t)addr & ~(uintptr_t)63, end = (uintptr_t)(addr + length);
    for (; p < end; p += 64) {
        flush_line((char *)p);
        lines_flushed++;
    }
    Py_RETURN_NONE;
}

static PyObject *py_sfence(PyObject *self, PyObject *unused)
{
    store_fence();
    fences++;
    Py_RETURN_NONE;
}

static PyObject *py_available(PyObject *self, PyObject *unused)
{
    static const char *names[] = {"none", "?", "clwb", "clflushopt", "clflush"};
    return PyUnicode_FromString(names[method + 1]);
}

static PyObject *py_counters(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(KK)", lines_flushed, fences);
}

static PyMethodDef methods[] = {
    {"flush", py_flush, METH_VARARGS, NULL},
    {"sfence", py_sfence, METH_NOARGS, NULL},
    {"method", py_available, METH_NOARGS, NULL},
    {"counters", py_counters, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "daxfs._pmemflush", NULL, -1,
                                    methods};

PyMODINIT_FUNC PyInit__pmemflush(void)
{
    detect();
    return PyModule_Create(&moddef);
}
