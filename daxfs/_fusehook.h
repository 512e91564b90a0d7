/* daxfs._fusehook: what the interposer (_fusehook.c) and the operations it answers in place
 * (_fuseops.c) share.  Include after <fuse_lowlevel.h> and <Python.h>. */
#ifndef DAXFS_FUSEHOOK_H
#define DAXFS_FUSEHOOK_H

/* _fusehook.c: set when pyfuse3 makes its session and at INIT */
extern struct fuse_session *hook_session;  /* the session pyfuse3 made through our hook */
extern int killpriv_v2_sent;               /* the INIT reply carried FUSE_HANDLE_KILLPRIV_V2 */
extern unsigned hook_proto_minor;          /* the negotiated protocol minor; 0 before INIT */

/* _fuseops.c */
void ops_patch(struct fuse_lowlevel_ops *o);   /* fill the slots we serve into pyfuse3's table */
int ops_kill_handler_set(void);                /* Python gave a kill_privileges handler */
PyObject *ops_py_set_handlers(PyObject *self, PyObject *args);
PyObject *ops_py_set_fast_path(PyObject *self, PyObject *args);
PyObject *ops_py_fast_stats(PyObject *self, PyObject *unused);
PyObject *ops_py_set_capability_xattrs(PyObject *self, PyObject *arg);

#endif
