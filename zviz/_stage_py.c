/*
 * zviz/_stage_py.c: the CPython binding of the spawn path (zviz/_stage.c).
 *
 * spawn(spec: bytes, command: bytes) -> (pid, pidfd, listener_fd)
 *   `spec` is the sandbox's part and `command` the spawn's, both packed by
 *   zviz/_spec.py in the layout documented in zviz/_abi.h. This file checks
 *   every count and offset, points a struct plan into the two buffers (which
 *   the caller keeps alive for the call) and runs stage_spawn without the GIL.
 *   A failed child step raises SetupError(step, errno, index); the id maps
 *   the memory cgroup and the monitor's map raise SetupError("id-map-WHAT" /
 *   "cgroup" / "track", errno, -1, path).
 *
 * The module also exports what Python must agree on (zviz/_abi.h): STEPS,
 * the limits, the fd numbers, the magic values, and LAYOUTS, the size and
 * field offsets of every record, which tests/test_abi.py checks against the
 * struct formats of zviz/_spec.py, _zygote.py and _kernel.py.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "_flight.h"
#include "_gate.h"
#include "_pump.h"
#include "_stage.h"

#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#endif
#define LL_CREATE_RULESET_VERSION (1U << 0)

static const char *const step_names[STEP_COUNT] = {
    [STEP_NONE] = NULL,
#define ZVIZ_STEP_NAME(name, str) [STEP_##name] = str,
    ZVIZ_STEPS(ZVIZ_STEP_NAME)
#undef ZVIZ_STEP_NAME
};

static PyObject *SetupError;

/* ---------------------------------------------------------------- parsing */

struct buf {
    const char *data;
    Py_ssize_t len;
    const char *name;
};

static int
bad(const struct buf *b, const char *what)
{
    PyErr_Format(PyExc_ValueError, "malformed %s buffer: %s", b->name, what);
    return -1;
}

/* A string at offset `off` (0: none -> NULL), NUL-terminated within the buffer. */
static int
string_at(const struct buf *b, unsigned int off, const char **out)
{
    if (off == 0) {
        *out = NULL;
        return 0;
    }
    if ((Py_ssize_t)off >= b->len || !memchr(b->data + off, 0, b->len - off))
        return bad(b, "a string offset out of bounds");
    *out = b->data + off;
    return 0;
}

/* A table of n records of `size` at *pos; advances *pos. */
static const void *
table_at(const struct buf *b, Py_ssize_t *pos, unsigned int n, size_t size, unsigned int max, const char *what)
{
    if (n > max) {
        PyErr_Format(PyExc_ValueError, "too many %s: %u (at most %u)", what, n, max);
        return NULL;
    }
    if (*pos + (Py_ssize_t)(n * size) > b->len) {
        bad(b, what);
        return NULL;
    }
    const void *t = b->data + *pos;
    *pos += (Py_ssize_t)(n * size);
    return t;
}

static int
parse_spec(const struct buf *b, struct plan *p, struct parent_plan *pp)
{
    struct spec_header h;
    if (b->len < (Py_ssize_t)sizeof h)
        return bad(b, "shorter than its header");
    memcpy(&h, b->data, sizeof h);
    if (h.magic != SPEC_MAGIC)
        return bad(b, "bad magic");
    Py_ssize_t pos = sizeof h;
    const struct spec_bind *binds = table_at(b, &pos, h.n_binds, sizeof *binds, MAX_BINDS, "bind mounts");
    const struct spec_op *ops = binds ? table_at(b, &pos, h.n_ops, sizeof *ops, MAX_MOUNT_OPS, "mount operations") : NULL;
    const struct spec_mask *masks = ops ? table_at(b, &pos, h.n_masks, sizeof *masks, MAX_MASKS, "masks") : NULL;
    const struct spec_rlimit *rl = masks ? table_at(b, &pos, h.n_rlimits, sizeof *rl, MAX_RLIMITS, "rlimits") : NULL;
    const struct spec_path *paths = rl ? table_at(b, &pos, h.n_ll_paths, sizeof *paths, MAX_LL_PATHS, "landlock paths") : NULL;
    const struct spec_port *ports = paths ? table_at(b, &pos, h.n_ll_ports, sizeof *ports, MAX_LL_PORTS, "landlock ports") : NULL;
    if (!ports)
        return -1;
    if (h.bpf_len % sizeof(struct sock_filter) || h.bpf_off % 8 || (Py_ssize_t)h.bpf_off + h.bpf_len > b->len)
        return bad(b, "the seccomp program's place");

    p->mount_ns = !!(h.flags & SPEC_MOUNT_NS);
    p->mount_proc = !!(h.flags & SPEC_MOUNT_PROC);
    p->new_root = !!(h.flags & SPEC_NEW_ROOT);
    p->loopback_up = !!(h.flags & SPEC_LOOPBACK_UP);
    p->setsid = !!(h.flags & SPEC_SETSID);
    p->creds_late = !!(h.flags & SPEC_CREDS_LATE);
    p->drop_groups = !!(h.flags & SPEC_DROP_GROUPS);
    p->command_ruleset = !!(h.flags & SPEC_COMMAND_RULESET);
    p->root_readonly = !!(h.flags & SPEC_ROOT_READONLY);
    p->cgroup_ns = !!(h.flags & SPEC_CGROUP_NS);
    p->uid = (long)h.uid;
    p->gid = (long)h.gid;
    p->pdeathsig = h.pdeathsig;
    p->landlock_abi = h.landlock_abi;
    p->seccomp_flags = h.seccomp_flags;
    p->ll_fs = h.ll_fs;
    p->ll_net = h.ll_net;
    p->ll_scoped = h.ll_scoped;
    if (string_at(b, h.staging, &p->staging) || string_at(b, h.hostname, &p->hostname) ||
        string_at(b, h.uid_map, &pp->uid_map) || string_at(b, h.gid_map, &pp->gid_map))
        return -1;
    if (p->new_root && !p->staging)
        return bad(b, "a new root without a staging directory");
    pp->clone_flags = (unsigned long)h.clone_flags;
    pp->blank_netns = !!(h.flags & SPEC_BLANK_NETNS);
    if (pp->blank_netns && (pp->clone_flags & CLONE_NEWNET))
        return bad(b, "both a blank and a new network namespace");
    pp->deny_setgroups = !!(h.flags & SPEC_DENY_SETGROUPS);

    p->n_src = (int)h.n_binds;
    for (unsigned i = 0; i < h.n_binds; i++) {
        if (string_at(b, binds[i].src, &p->src[i]) < 0)
            return -1;
        if (!p->src[i])
            return bad(b, "a bind without a source");
        p->src_ro[i] = !!binds[i].read_only;
    }
    p->n_ops = (int)h.n_ops;
    for (unsigned i = 0; i < h.n_ops; i++) {
        if (ops[i].kind < OP_MKDIR || ops[i].kind > OP_TMPFS)
            return bad(b, "an unknown mount operation");
        if (ops[i].kind == OP_MOVE && (ops[i].bind < 0 || ops[i].bind >= p->n_src))
            return bad(b, "a mount operation names a bind that does not exist");
        if (string_at(b, ops[i].path, &p->op_path[i]) || string_at(b, ops[i].arg, &p->op_arg[i]))
            return -1;
        if (!p->op_path[i])
            return bad(b, "a mount operation without a path");
        p->op_kind[i] = (int)ops[i].kind;
        p->op_src[i] = ops[i].bind;
    }
    p->n_masks = (int)h.n_masks;
    for (unsigned i = 0; i < h.n_masks; i++) {
        if (masks[i].kind < MASK_FILE || masks[i].kind > MASK_PIN)
            return bad(b, "an unknown mask");
        if (string_at(b, masks[i].path, &p->mask_path[i]) < 0)
            return -1;
        if (!p->mask_path[i])
            return bad(b, "a mask without a path");
        p->mask_kind[i] = (int)masks[i].kind;
    }
    p->n_rlimits = (int)h.n_rlimits;
    for (unsigned i = 0; i < h.n_rlimits; i++) {
        p->rl_res[i] = (int)rl[i].res;
        p->rl_val[i].rlim_cur = rl[i].soft;
        p->rl_val[i].rlim_max = rl[i].hard;
    }
    p->n_ll_paths = (int)h.n_ll_paths;
    for (unsigned i = 0; i < h.n_ll_paths; i++) {
        if (string_at(b, paths[i].path, &p->ll_path[i]) < 0)
            return -1;
        if (!p->ll_path[i])
            return bad(b, "a landlock rule without a path");
        p->ll_access[i] = paths[i].access;
    }
    p->n_ll_ports = (int)h.n_ll_ports;
    for (unsigned i = 0; i < h.n_ll_ports; i++) {
        p->ll_port[i] = ports[i].port;
        p->ll_port_access[i] = ports[i].access;
    }
    p->prog.len = (unsigned short)(h.bpf_len / sizeof(struct sock_filter));
    p->prog.filter = (struct sock_filter *)(b->data + h.bpf_off);
    return 0;
}

/* argv and envp: arrays of pointers, NULL-terminated (PyMem, freed by the caller). */
static char **
string_array(const struct buf *b, const unsigned int *offs, unsigned int n)
{
    char **out = PyMem_Calloc(n + 1, sizeof(char *));
    if (!out) {
        PyErr_NoMemory();
        return NULL;
    }
    for (unsigned i = 0; i < n; i++) {
        const char *s;
        if (string_at(b, offs[i], &s) || !s) {
            if (!PyErr_Occurred())
                bad(b, "a null argv/envp string");
            PyMem_Free(out);
            return NULL;
        }
        out[i] = (char *)s;
    }
    return out;
}

static int
parse_command(const struct buf *b, struct plan *p, struct parent_plan *pp)
{
    struct command_header h;
    if (b->len < (Py_ssize_t)sizeof h)
        return bad(b, "shorter than its header");
    memcpy(&h, b->data, sizeof h);
    if (h.magic != COMMAND_MAGIC)
        return bad(b, "bad magic");
    if (h.n_argv == 0 || (Py_ssize_t)sizeof h + ((Py_ssize_t)h.n_argv + h.n_envp) * 4 > b->len)
        return bad(b, "argv/envp tables");
    const unsigned int *argv = (const unsigned int *)(b->data + sizeof h);
    p->fd_in = h.fd_in;
    p->fd_out = h.fd_out;
    p->fd_err = h.fd_err;
    p->init_fd = h.init_fd;
    p->status_fd = h.status_fd;
    pp->track_map_fd = h.track_map_fd;
    pp->track_value = h.track_value;
    pp->cgroup_fd = h.cgroup_fd;
    pp->netns_fd = h.netns_fd;
    if (string_at(b, h.exe, &p->exe) || string_at(b, h.cwd, &p->cwd))
        return -1;
    if (!p->exe)
        return bad(b, "no exe");
    if (!(p->argv = string_array(b, argv, h.n_argv)))
        return -1;
    if (!(p->envp = string_array(b, argv + h.n_argv, h.n_envp)))
        return -1;
    return 0;
}

/* ---------------------------------------------------------------- spawn */

static PyObject *
setup_error(const char *step, int err, int index, const char *path)
{
    PyObject *exc = PyObject_CallFunction(SetupError, "siiz", step, err, index, path);
    if (exc) {
        PyErr_SetObject(SetupError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* The exception for a failed spawn (out->failure != SPAWN_OK); returns NULL. */
static PyObject *
spawn_failure(const struct spawn_result *out)
{
    char name[32];
    switch (out->failure) {
    case SPAWN_OK:
        break;
    case SPAWN_OSERROR:
        errno = out->err;
        return PyErr_SetFromErrno(PyExc_OSError);
    case SPAWN_STEP:
        if (out->step > STEP_NONE && out->step < STEP_COUNT)
            return setup_error(step_names[out->step], out->err, out->index, NULL);
        snprintf(name, sizeof name, "step-%d", out->step);
        return setup_error(name, out->err, out->index, NULL);
    case SPAWN_ID_MAP:
        snprintf(name, sizeof name, "id-map-%s", out->what);
        return setup_error(name, out->err, -1, out->path);
    case SPAWN_CGROUP:
        return setup_error("cgroup", out->err, -1, "cgroup.procs");
    case SPAWN_TRACK:
        return setup_error("track", out->err, -1, "bpf map");
    case SPAWN_PROTOCOL:
        return setup_error("spawn", EIO, -1, out->what);
    }
    PyErr_SetString(PyExc_SystemError, "spawn_failure without a failure");
    return NULL;
}

/* The parsed plan of one spawn and the buffers it points into. */
struct parsed {
    Py_buffer spec_view, command_view;
    struct plan *p; /* ~20 kB: not on our stack */
    struct parent_plan pp;
};

static void
parsed_free(struct parsed *x)
{
    if (x->p) {
        PyMem_Free(x->p->argv);
        PyMem_Free(x->p->envp);
        PyMem_Free(x->p);
        x->p = NULL;
    }
    PyBuffer_Release(&x->spec_view);
    PyBuffer_Release(&x->command_view);
}

/* 0, or -1 with an exception and nothing held. */
static int
parse_args(PyObject *args, const char *format, struct parsed *x)
{
    memset(x, 0, sizeof *x);
    if (!PyArg_ParseTuple(args, format, &x->spec_view, &x->command_view))
        return -1;
    struct buf spec = {x->spec_view.buf, x->spec_view.len, "spec"};
    struct buf command = {x->command_view.buf, x->command_view.len, "command"};
    if (!(x->p = PyMem_Calloc(1, sizeof *x->p))) {
        PyErr_NoMemory();
        parsed_free(x);
        return -1;
    }
    if (parse_spec(&spec, x->p, &x->pp) < 0 || parse_command(&command, x->p, &x->pp) < 0) {
        parsed_free(x);
        return -1;
    }
    return 0;
}

static PyObject *
spawn_common(PyObject *args, int warm)
{
    struct parsed x;
    struct spawn_result out;
    PyObject *result = NULL;
    if (parse_args(args, warm ? "y*y*:spawn_warm" : "y*y*:spawn", &x) < 0)
        return NULL;
    if (warm) {
        /* a fork of this interpreter: as os.fork() does, with the GIL held
         * (the caller is single-threaded: _warmboot.py) */
        PyOS_BeforeFork();
        stage_spawn(x.p, &x.pp, &out, 1);
        if (out.failure == SPAWN_OK && out.pid == 0) {
            PyOS_AfterFork_Child();
            result = Py_None;
            Py_INCREF(result);
            goto done;
        }
        PyOS_AfterFork_Parent();
    } else {
        Py_BEGIN_ALLOW_THREADS
        stage_spawn(x.p, &x.pp, &out, 0);
        Py_END_ALLOW_THREADS
    }
    if (out.failure == SPAWN_OK)
        result = Py_BuildValue("(iii)", out.pid, out.pidfd, out.listener);
    else
        spawn_failure(&out);
done:
    parsed_free(&x);
    return result;
}

/* ---------------------------------------------------------------- a spawn in two halves
 *
 * spawn_start(spec, command) -> pending: the clone, the id maps, the child
 * let go (raises as spawn does for what fails before that). The child then
 * sets itself up on its own; pending_info(pending) -> (fd, pid): the fd
 * turns readable when it has exec'd or failed (the pid, unreaped until
 * finish or abort, may be signalled meanwhile), spawn_finish(pending) -> (pid,
 * pidfd, listener) its outcome (raises as spawn does), spawn_abort(pending)
 * SIGKILLs and reaps it. The pending object holds the parsed plan and the
 * two buffers (the child reads them, in our memory, until its exec): a
 * pending spawn collected unfinished is aborted first, then freed. */

#define PENDING_CAPSULE "zviz._stage.pending_spawn"

struct pending {
    struct parsed x;
    struct spawn_pending pend;
    int live;    /* pend holds a child */
    pid_t owner; /* the process that spawned it: a fork of it (its copy of this object, collected at
                  * its exit) must not kill or reap that child through the pidfd it inherited */
};

static void
pending_abort(struct pending *pg)
{
    if (pg->live) {
        pg->live = 0;
        if (getpid() != pg->owner) {
            stage_spawn_forget(&pg->pend);
        } else {
            Py_BEGIN_ALLOW_THREADS
            stage_spawn_abort(&pg->pend);
            Py_END_ALLOW_THREADS
        }
    }
    parsed_free(&pg->x); /* only now: the child is dead or has exec'd */
}

static void
pending_capsule_free(PyObject *cap)
{
    struct pending *pg = PyCapsule_GetPointer(cap, PENDING_CAPSULE);
    if (pg) {
        pending_abort(pg);
        PyMem_Free(pg);
    }
}

static struct pending *
pending_of(PyObject *cap)
{
    return PyCapsule_GetPointer(cap, PENDING_CAPSULE); /* (raises on another object) */
}

static PyObject *
stage_spawn_start_py(PyObject *self, PyObject *args)
{
    struct pending *pg = PyMem_Calloc(1, sizeof *pg);
    struct spawn_result out;
    if (!pg)
        return PyErr_NoMemory();
    if (parse_args(args, "y*y*:spawn_start", &pg->x) < 0) {
        PyMem_Free(pg);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    stage_spawn_start(pg->x.p, &pg->x.pp, &out, &pg->pend);
    Py_END_ALLOW_THREADS
    if (out.failure != SPAWN_OK) {
        parsed_free(&pg->x);
        PyMem_Free(pg);
        return spawn_failure(&out);
    }
    pg->live = 1;
    pg->owner = getpid();
    PyObject *cap = PyCapsule_New(pg, PENDING_CAPSULE, pending_capsule_free);
    if (!cap) {
        pending_abort(pg);
        PyMem_Free(pg);
    }
    return cap;
}

static PyObject *
stage_pending_info_py(PyObject *self, PyObject *cap)
{
    struct pending *pg = pending_of(cap);
    if (!pg)
        return NULL;
    if (!pg->live)
        return Py_BuildValue("(ii)", -1, -1);
    return Py_BuildValue("(ii)", pg->pend.errp, pg->pend.pid);
}

static PyObject *
stage_spawn_finish_py(PyObject *self, PyObject *cap)
{
    struct pending *pg = pending_of(cap);
    struct spawn_result out;
    if (!pg)
        return NULL;
    if (!pg->live) {
        PyErr_SetString(PyExc_ValueError, "this spawn was finished or aborted already");
        return NULL;
    }
    pg->live = 0;
    Py_BEGIN_ALLOW_THREADS
    stage_spawn_finish(&pg->pend, &out);
    Py_END_ALLOW_THREADS
    parsed_free(&pg->x);
    if (out.failure != SPAWN_OK)
        return spawn_failure(&out);
    return Py_BuildValue("(iii)", out.pid, out.pidfd, out.listener);
}

static PyObject *
stage_pending_kill_py(PyObject *self, PyObject *cap)
{
    struct pending *pg = pending_of(cap);
    if (!pg)
        return NULL;
    if (pg->live && getpid() == pg->owner)
        stage_spawn_kill(&pg->pend);
    Py_RETURN_NONE;
}

static PyObject *
stage_spawn_abort_py(PyObject *self, PyObject *cap)
{
    struct pending *pg = pending_of(cap);
    if (!pg)
        return NULL;
    pending_abort(pg);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- small calls */

static PyObject *
stage_landlock_abi(PyObject *self, PyObject *noargs)
{
    long abi = syscall(SYS_landlock_create_ruleset, NULL, 0, LL_CREATE_RULESET_VERSION);
    if (abi < 0)
        return PyLong_FromLong(-errno);
    return PyLong_FromLong(abi);
}

static PyObject *
stage_pidfd_getfd(PyObject *self, PyObject *args)
{
    int pidfd, fd;
    if (!PyArg_ParseTuple(args, "ii:pidfd_getfd", &pidfd, &fd))
        return NULL;
    int r = syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(r);
}

/* ------------------------------------------------------------ the pump */

#define PUMP_CAPSULE "zviz._stage.pump"

static void
pump_capsule_free(PyObject *cap)
{
    struct pump *p = PyCapsule_GetPointer(cap, PUMP_CAPSULE);
    if (p)
        pump_release(p);
}

/* pump_start(listener, out, stop) -> capsule: zviz/_pump.c */
static PyObject *
stage_pump_start(PyObject *self, PyObject *args)
{
    int listener, out, stop, netns = -1, gate = -1, dns4 = -1, dns6 = -1, sockets_ns = -1, sockets_allow = 0;
    int err = 0;
    if (!PyArg_ParseTuple(args, "iii|iiiiii:pump_start", &listener, &out, &stop, &netns, &gate, &dns4, &dns6,
                          &sockets_ns, &sockets_allow))
        return NULL;
    struct pump *p;
    Py_BEGIN_ALLOW_THREADS
    p = pump_start(listener, out, stop, netns, gate, dns4, dns6, sockets_ns, sockets_allow, &err);
    Py_END_ALLOW_THREADS
    if (!p) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *cap = PyCapsule_New(p, PUMP_CAPSULE, pump_capsule_free);
    if (!cap)
        pump_release(p);
    return cap;
}

/* A table for the pump: fn(pump, blob, length, budget) gives 0, an errno, or -1 (not a pump). */
static PyObject *
pump_table_call(PyObject *cap, Py_buffer *blob, long budget, int (*fn)(struct pump *, const unsigned char *,
                                                                        size_t, long))
{
    struct pump *p = PyCapsule_GetPointer(cap, PUMP_CAPSULE);
    int err = p ? fn(p, blob->buf, (size_t)blob->len, budget) : -1;
    PyBuffer_Release(blob);
    if (err < 0)
        return NULL;
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static int
set_names(struct pump *p, const unsigned char *blob, size_t len, long unused)
{
    return pump_set_names(p, blob, len);
}

static PyObject *
stage_pump_set_table(PyObject *self, PyObject *args)
{
    PyObject *cap;
    Py_buffer blob;
    long budget = -1;
    if (!PyArg_ParseTuple(args, "Oy*|l:pump_set_table", &cap, &blob, &budget))
        return NULL;
    return pump_table_call(cap, &blob, budget, pump_set_table);
}

static PyObject *
stage_pump_set_names(PyObject *self, PyObject *args)
{
    PyObject *cap;
    Py_buffer blob;
    if (!PyArg_ParseTuple(args, "Oy*:pump_set_names", &cap, &blob))
        return NULL;
    return pump_table_call(cap, &blob, -1, set_names);
}

static PyObject *
stage_pump_give_back(PyObject *self, PyObject *args)
{
    PyObject *cap;
    long n;
    if (!PyArg_ParseTuple(args, "Ol:pump_give_back", &cap, &n))
        return NULL;
    struct pump *p = PyCapsule_GetPointer(cap, PUMP_CAPSULE);
    if (!p)
        return NULL;
    pump_give_back(p, n);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------ the gate */

/* gate_open() -> (map_fd, prog_fd): zviz/_gate.c (the verifier's log in the error) */
static PyObject *
stage_gate_open(PyObject *self, PyObject *args)
{
    int tgid, map = -1, prog = -1;
    if (!PyArg_ParseTuple(args, "i:gate_open", &tgid))
        return NULL;
    static char log[8192];
    int r = gate_open(tgid, &map, &prog, log, sizeof log);
    if (r < 0) {
        errno = -r;
        PyObject *e = PyObject_CallFunction(PyExc_OSError, "is", -r, log[0] ? log : strerror(-r));
        if (e) {
            PyErr_SetObject(PyExc_OSError, e);
            Py_DECREF(e);
        }
        return NULL;
    }
    return Py_BuildValue("(ii)", map, prog);
}

static PyObject *
stage_gate_add(PyObject *self, PyObject *args)
{
    int map, up, capture;
    if (!PyArg_ParseTuple(args, "iii:gate_add", &map, &up, &capture))
        return NULL;
    struct gate_key key;
    int r = gate_add(map, up, capture, &key);
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBytes_FromStringAndSize((const char *)&key, sizeof key);
}

static PyObject *
stage_gate_key(PyObject *self, PyObject *args)
{
    int up;
    if (!PyArg_ParseTuple(args, "i:gate_key", &up))
        return NULL;
    struct gate_key key;
    int r = gate_key_of(up, &key);
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBytes_FromStringAndSize((const char *)&key, sizeof key);
}

/* gate_remove(map, key, which=-1) -> bool: the connection's entries out (which: 0 the socket's, 1 the
 * capture socket's, -1 both); False if none was in */
static PyObject *
stage_gate_remove(PyObject *self, PyObject *args)
{
    int map, which = -1;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "iy*|i:gate_remove", &map, &b, &which))
        return NULL;
    if (b.len != (Py_ssize_t)sizeof(struct gate_key)) {
        PyBuffer_Release(&b);
        return PyErr_Format(PyExc_ValueError, "a gate key is %zu bytes", sizeof(struct gate_key));
    }
    struct gate_key key;
    memcpy(&key, b.buf, sizeof key);
    PyBuffer_Release(&b);
    key.kind = GATE_SOCKET;
    int r1 = which == GATE_CAPTURE ? -ENOENT : gate_remove_one(map, &key);
    key.kind = GATE_CAPTURE;
    int r2 = which == GATE_SOCKET ? -ENOENT : gate_remove_one(map, &key);
    if ((r1 < 0 && r1 != -ENOENT) || (r2 < 0 && r2 != -ENOENT)) {
        errno = r1 < 0 && r1 != -ENOENT ? -r1 : -r2;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(r1 == 0 || r2 == 0);
}

/* ------------------------------------------------------------ the fast checks (tests/test_flight.py) */

static PyObject *
stage_flight_check(PyObject *self, PyObject *args)
{
    Py_buffer b;
    const char *name;
    int port;
    if (!PyArg_ParseTuple(args, "y*si:flight_check", &b, &name, &port))
        return NULL;
    int r = flight_check(b.buf, (size_t)b.len, name, port);
    PyBuffer_Release(&b);
    return PyLong_FromLong(r);
}

static PyObject *
stage_dns_query_name(PyObject *self, PyObject *args)
{
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "y*:dns_query_name", &b))
        return NULL;
    char name[256];
    unsigned qtype = 0;
    size_t end = 0;
    int r = dns_query_name(b.buf, (size_t)b.len, name, sizeof name, &qtype, &end);
    PyObject *out = r < 0 ? Py_NewRef(Py_None) : Py_BuildValue("(sIn)", name, qtype, (Py_ssize_t)end);
    PyBuffer_Release(&b);
    return out;
}

static PyObject *
stage_dns_answer(PyObject *self, PyObject *args)
{
    Py_buffer q, a;
    Py_ssize_t end;
    unsigned qtype;
    if (!PyArg_ParseTuple(args, "y*nIy*:dns_answer", &q, &end, &qtype, &a))
        return NULL;
    unsigned char out[600];
    size_t n = 0;
    if (a.len == 4 && end >= 12 && end <= q.len)
        n = dns_answer(q.buf, (size_t)end, qtype, a.buf, out, sizeof out);
    PyBuffer_Release(&q);
    PyBuffer_Release(&a);
    if (!n)
        return PyErr_Format(PyExc_ValueError, "no answer");
    return PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)n);
}

static PyObject *
stage_notif_sizes(PyObject *self, PyObject *noargs)
{
    struct seccomp_notif_sizes s;
    if (syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &s) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return Py_BuildValue("(iii)", s.seccomp_notif, s.seccomp_notif_resp, s.seccomp_data);
}

static PyObject *
stage_seccomp_action_avail(PyObject *self, PyObject *args)
{
    unsigned int action;
    if (!PyArg_ParseTuple(args, "I", &action))
        return NULL;
    long r = syscall(SYS_seccomp, SECCOMP_GET_ACTION_AVAIL, 0, &action);
    return PyBool_FromLong(r == 0);
}

static PyObject *
stage_kill_uid_py(PyObject *self, PyObject *args)
{
    unsigned int uid, gid;
    long r;
    if (!PyArg_ParseTuple(args, "II:kill_uid", &uid, &gid))
        return NULL;
    if (uid == 0 || gid == 0 || uid == (unsigned int)-1 || gid == (unsigned int)-1) {
        PyErr_SetString(PyExc_ValueError, "kill_uid: refusing uid/gid 0 or -1");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    r = stage_kill_uid(uid, gid);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        errno = (int)-r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(r);
}

static PyObject *
stage_mount_template_py(PyObject *self, PyObject *args)
{
    const char *lower, *upper, *work, *target;
    unsigned int owner_uid, owner_gid, uid, gid;
    int step = -1;
    long r;
    struct template_helper helper = {-1, NULL};
    if (!PyArg_ParseTuple(args, "yyyyIIII:mount_template", &lower, &upper, &work, &target, &owner_uid, &owner_gid,
                          &uid, &gid))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    r = stage_mount_template(lower, upper, work, target, owner_uid, owner_gid, uid, gid, &step, &helper);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        stage_reap_template_helper(&helper);
        return Py_BuildValue("(iiO)", step, (int)-r, Py_None);
    }
    PyObject *cap = PyBytes_FromStringAndSize((const char *)&helper, sizeof helper);
    if (!cap) {
        stage_reap_template_helper(&helper);
        return NULL;
    }
    PyObject *out = Py_BuildValue("(iiN)", -1, 0, cap);
    return out;
}

/* The helper of a mount_template call, as its opaque bytes: reaped once. */
static PyObject *
stage_reap_template_helper_py(PyObject *self, PyObject *args)
{
    const char *buf;
    Py_ssize_t len;
    struct template_helper helper;
    if (!PyArg_ParseTuple(args, "y#:reap_template_helper", &buf, &len))
        return NULL;
    if (len != (Py_ssize_t)sizeof helper) {
        PyErr_SetString(PyExc_ValueError, "reap_template_helper: not a helper of mount_template");
        return NULL;
    }
    memcpy(&helper, buf, sizeof helper);
    Py_BEGIN_ALLOW_THREADS
    stage_reap_template_helper(&helper);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *
stage_spawn_py(PyObject *self, PyObject *args)
{
    return spawn_common(args, 0);
}

static PyObject *
stage_spawn_warm_py(PyObject *self, PyObject *args)
{
    return spawn_common(args, 1);
}

/* ---------------------------------------------------------------- network namespaces (zviz/_netns.py)
 *
 * A network namespace is per thread: these enter one on the calling thread
 * for a single call and return to the thread's own before they return. If
 * that return failed the thread would go on making the host's sockets in
 * another namespace, so it aborts the process instead (it cannot fail for a
 * caller that passed netns_enter's check of the way back: the fd of its own
 * namespace is held, and a thread's credentials do not change meanwhile). */

static int
netns_enter(int netns_fd, int *ours)
{
    *ours = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (*ours < 0)
        return -1;
    /* First a setns into its own (no move; the very checks of the way back): a caller that could
     * enter another namespace, or make one, but not come back (root of a user namespace that
     * shares its parent's network: `unshare -Ur`, a rootless container on the host's network)
     * is refused here, not aborted by netns_leave. */
    if (setns(*ours, CLONE_NEWNET) < 0 || (netns_fd >= 0 && setns(netns_fd, CLONE_NEWNET) < 0)) {
        int e = errno;
        close(*ours);
        errno = e;
        return -1;
    }
    return 0;
}

static void
netns_leave(int ours)
{
    if (setns(ours, CLONE_NEWNET) < 0)
        abort();
    close(ours);
}

/* netns_new() -> fd: a new, empty network namespace (its loopback down). */
static PyObject *
stage_netns_new(PyObject *self, PyObject *args)
{
    int ours;
    if (netns_enter(-1, &ours) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    int fd = -1, e = 0;
    if (unshare(CLONE_NEWNET) < 0) {
        /* The thread never moved: nothing to leave. (Going back would be a
         * setns, which a caller that cannot unshare cannot do either: root
         * without CAP_SYS_ADMIN, a container's seccomp filter. Leaving here
         * aborted the host process at its first `none` sandbox there.) */
        e = errno;
        close(ours);
        errno = e;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if ((fd = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)) < 0)
        e = errno;
    netns_leave(ours);
    if (fd < 0) {
        errno = e;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(fd);
}

/* socket_in(netns, family, type, protocol) -> fd;
 * socketpair_in(netns, family, type, protocol) -> (fd, fd): made in that
 * namespace (a socket belongs for good to the namespace it was made in). */
static PyObject *
netns_socket(PyObject *args, int pair)
{
    int netns, family, type, protocol;
    if (!PyArg_ParseTuple(args, pair ? "iiii:socketpair_in" : "iiii:socket_in", &netns, &family, &type, &protocol))
        return NULL;
    if (netns < 0) {
        errno = EBADF;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int ours;
    if (netns_enter(netns, &ours) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    int sv[2] = {-1, -1};
    int r = pair ? socketpair(family, type, protocol, sv) : (sv[0] = socket(family, type, protocol));
    int e = errno;
    netns_leave(ours);
    if (r < 0) {
        errno = e;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return pair ? Py_BuildValue("(ii)", sv[0], sv[1]) : PyLong_FromLong(sv[0]);
}

/* count_sockets_in(netns) -> how many sockets (made from user space: sockstat) it holds. */
static PyObject *
stage_count_sockets_in(PyObject *self, PyObject *args)
{
    int netns, ours;
    if (!PyArg_ParseTuple(args, "i:count_sockets_in", &netns))
        return NULL;
    if (netns < 0) {
        errno = EBADF;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (netns_enter(netns, &ours) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    long n = count_sockets_here();
    int e = errno;
    netns_leave(ours);
    if (n < 0) {
        errno = e ? e : EIO;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(n);
}

static PyObject *
stage_socket_in(PyObject *self, PyObject *args)
{
    return netns_socket(args, 0);
}

static PyObject *
stage_socketpair_in(PyObject *self, PyObject *args)
{
    return netns_socket(args, 1);
}

static PyMethodDef methods[] = {
    {"spawn", stage_spawn_py, METH_VARARGS, "spawn(spec, command) -> (pid, pidfd, listener): clone, set up, exec."},
    {"spawn_start", stage_spawn_start_py, METH_VARARGS,
     "spawn_start(spec, command) -> pending: clone and let go; the child sets up on its own."},
    {"pending_info", stage_pending_info_py, METH_O,
     "pending_info(pending) -> (fd readable once the child exec'd or failed, its pid); (-1, -1) when done."},
    {"spawn_finish", stage_spawn_finish_py, METH_O, "spawn_finish(pending) -> (pid, pidfd, listener)."},
    {"spawn_abort", stage_spawn_abort_py, METH_O, "spawn_abort(pending): SIGKILL and reap the child."},
    {"pending_kill", stage_pending_kill_py, METH_O,
     "pending_kill(pending): SIGKILL the child by its pidfd (finish or abort reaps it); nothing once done."},
    {"spawn_warm", stage_spawn_warm_py, METH_VARARGS,
     "spawn_warm(spec, command) -> (pid, pidfd, listener) in the caller, None in the child: a fork of the caller "
     "that returns inside the sandbox instead of exec (init_fd is placed on fd 6)."},
    {"landlock_abi", stage_landlock_abi, METH_NOARGS, "Landlock ABI version, or -errno."},
    {"netns_new", stage_netns_new, METH_NOARGS, "netns_new() -> fd: a new network namespace (this thread stays in its own)."},
    {"socket_in", stage_socket_in, METH_VARARGS, "socket_in(netns, family, type, protocol) -> fd, made in that namespace."},
    {"count_sockets_in", stage_count_sockets_in, METH_VARARGS,
     "count_sockets_in(netns) -> the sockets in that namespace (sockstat's used: the kernel's own not counted)."},
    {"socketpair_in", stage_socketpair_in, METH_VARARGS,
     "socketpair_in(netns, family, type, protocol) -> (fd, fd), made in that namespace."},
    {"pidfd_getfd", stage_pidfd_getfd, METH_VARARGS, "Duplicate fd of the process behind pidfd."},
    {"pump_start", stage_pump_start, METH_VARARGS,
     "pump_start(listener, out, stop, netns=-1, gate=-1) -> pump: receive the listener's notifications in a "
     "thread (zviz/_pump.c)."},
    {"pump_set_table", stage_pump_set_table, METH_VARARGS,
     "pump_set_table(pump, blob, budget=-1): the endpoints it connects (and its budget of gated connects)."},
    {"pump_give_back", stage_pump_give_back, METH_VARARGS, "pump_give_back(pump, n): n gated connects ended."},
    {"pump_set_names", stage_pump_set_names, METH_VARARGS, "pump_set_names(pump, blob): the names checked."},
    {"gate_open", stage_gate_open, METH_VARARGS,
     "gate_open(tgid) -> (map_fd, prog_fd): the SOCKHASH and its SK_MSG program (zviz/_gate.c)."},
    {"gate_add", stage_gate_add, METH_VARARGS, "gate_add(map, up, capture) -> key: hold up's sends in capture."},
    {"gate_key", stage_gate_key, METH_VARARGS, "gate_key(up) -> key: the map key of TCP socket up."},
    {"gate_remove", stage_gate_remove, METH_VARARGS, "gate_remove(map, key, which=-1) -> bool: release the connection (0: its socket, 1: its capture)."},
    {"flight_check", stage_flight_check, METH_VARARGS,
     "flight_check(buf, name, port) -> 1 (passes), 0 (incomplete), -1 (Python's): zviz/_flight.c."},
    {"dns_query_name", stage_dns_query_name, METH_VARARGS, "dns_query_name(q) -> (name, qtype, end) or None."},
    {"dns_answer", stage_dns_answer, METH_VARARGS, "dns_answer(q, end, qtype, addr4) -> the A answer."},
    {"notif_sizes", stage_notif_sizes, METH_NOARGS, "SECCOMP_GET_NOTIF_SIZES."},
    {"seccomp_action_avail", stage_seccomp_action_avail, METH_VARARGS, "SECCOMP_GET_ACTION_AVAIL."},
    {"kill_uid", stage_kill_uid_py, METH_VARARGS, "SIGKILL every process of a uid (kill(-1) as that uid)."},
    {"mount_template", stage_mount_template_py, METH_VARARGS,
     "mount_template(lower, upper, work, target, owner_uid, owner_gid, uid, gid) -> (step, errno, helper): "
     "(-1, 0, helper) if mounted; reap the helper once with reap_template_helper."},
    {"reap_template_helper", stage_reap_template_helper_py, METH_VARARGS,
     "Reap the helper of a mount_template call (once)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "zviz._stage", NULL, -1, methods};

/* LAYOUTS[name] = (sizeof, {field: offset}) */
#define FIELD(type, f) #f, (long)offsetof(struct type, f)
static int
add_layout(PyObject *layouts, const char *name, long size, int n, ...)
{
    PyObject *fields = PyDict_New();
    if (!fields)
        return -1;
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++) {
        const char *f = va_arg(ap, const char *);
        long off = va_arg(ap, long);
        PyObject *v = PyLong_FromLong(off);
        if (!v || PyDict_SetItemString(fields, f, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(fields);
            va_end(ap);
            return -1;
        }
        Py_DECREF(v);
    }
    va_end(ap);
    PyObject *t = Py_BuildValue("(lN)", size, fields);
    if (!t)
        return -1;
    int r = PyDict_SetItemString(layouts, name, t);
    Py_DECREF(t);
    return r;
}

static int
add_layouts(PyObject *m)
{
    PyObject *l = PyDict_New();
    if (!l)
        return -1;
    if (add_layout(l, "spec_header", sizeof(struct spec_header), 23, FIELD(spec_header, magic),
                   FIELD(spec_header, flags), FIELD(spec_header, clone_flags), FIELD(spec_header, uid),
                   FIELD(spec_header, gid), FIELD(spec_header, pdeathsig), FIELD(spec_header, landlock_abi),
                   FIELD(spec_header, seccomp_flags), FIELD(spec_header, ll_fs), FIELD(spec_header, ll_net),
                   FIELD(spec_header, ll_scoped), FIELD(spec_header, staging), FIELD(spec_header, hostname),
                   FIELD(spec_header, uid_map), FIELD(spec_header, gid_map), FIELD(spec_header, n_binds),
                   FIELD(spec_header, n_ops), FIELD(spec_header, n_masks), FIELD(spec_header, n_rlimits),
                   FIELD(spec_header, n_ll_paths),
                   FIELD(spec_header, n_ll_ports), FIELD(spec_header, bpf_off), FIELD(spec_header, bpf_len)) < 0 ||
        add_layout(l, "spec_bind", sizeof(struct spec_bind), 2, FIELD(spec_bind, src), FIELD(spec_bind, read_only)) < 0 ||
        add_layout(l, "spec_op", sizeof(struct spec_op), 4, FIELD(spec_op, kind), FIELD(spec_op, path),
                   FIELD(spec_op, arg), FIELD(spec_op, bind)) < 0 ||
        add_layout(l, "spec_mask", sizeof(struct spec_mask), 2, FIELD(spec_mask, kind), FIELD(spec_mask, path)) < 0 ||
        add_layout(l, "spec_rlimit", sizeof(struct spec_rlimit), 3, FIELD(spec_rlimit, res),
                   FIELD(spec_rlimit, soft), FIELD(spec_rlimit, hard)) < 0 ||
        add_layout(l, "spec_path", sizeof(struct spec_path), 2, FIELD(spec_path, path), FIELD(spec_path, access)) < 0 ||
        add_layout(l, "spec_port", sizeof(struct spec_port), 2, FIELD(spec_port, port), FIELD(spec_port, access)) < 0 ||
        add_layout(l, "command_header", sizeof(struct command_header), 14, FIELD(command_header, magic),
                   FIELD(command_header, n_argv), FIELD(command_header, n_envp), FIELD(command_header, fd_in),
                   FIELD(command_header, fd_out), FIELD(command_header, fd_err), FIELD(command_header, init_fd),
                   FIELD(command_header, status_fd), FIELD(command_header, track_map_fd),
                   FIELD(command_header, track_value), FIELD(command_header, cgroup_fd),
                   FIELD(command_header, netns_fd), FIELD(command_header, exe),
                   FIELD(command_header, cwd)) < 0 ||
        add_layout(l, "child_error", sizeof(struct child_error), 3, FIELD(child_error, step),
                   FIELD(child_error, err), FIELD(child_error, index)) < 0 ||
        add_layout(l, "status_record", sizeof(struct status_record), 3, FIELD(status_record, magic),
                   FIELD(status_record, wstatus), FIELD(status_record, ru)) < 0 ||
        add_layout(l, "zreq_rl", sizeof(struct zreq_rl), 3, FIELD(zreq_rl, res), FIELD(zreq_rl, cur),
                   FIELD(zreq_rl, max)) < 0 ||
        add_layout(l, "zreq", sizeof(struct zreq), 6, FIELD(zreq, magic), FIELD(zreq, argc), FIELD(zreq, envc),
                   FIELD(zreq, nrl), FIELD(zreq, len), FIELD(zreq, rl)) < 0 ||
        add_layout(l, "pump_record", sizeof(struct pump_record), 8, FIELD(pump_record, kind),
                   FIELD(pump_record, err), FIELD(pump_record, fd), FIELD(pump_record, cloexec),
                   FIELD(pump_record, name), FIELD(pump_record, port), FIELD(pump_record, key),
                   FIELD(pump_record, notif)) < 0) {
        Py_DECREF(l);
        return -1;
    }
    return PyModule_AddObject(m, "LAYOUTS", l) < 0 ? (Py_DECREF(l), -1) : 0;
}

PyMODINIT_FUNC
PyInit__stage(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    /* SetupError(step, errno, index, path): a setup step failed. Not an
     * OSError: OSError would fold its args to (errno, strerror). */
    SetupError = PyErr_NewExceptionWithDoc(
        "zviz._stage.SetupError",
        "A spawn's setup step failed: args (step name, errno, index into the spec's table or -1, path or None).",
        PyExc_Exception, NULL);
    PyObject *steps = PyTuple_New(STEP_COUNT);
    if (!SetupError || !steps)
        goto fail;
    for (int i = 0; i < STEP_COUNT; i++) {
        PyObject *v = step_names[i] ? PyUnicode_FromString(step_names[i]) : Py_NewRef(Py_None);
        if (!v)
            goto fail;
        PyTuple_SET_ITEM(steps, i, v);
    }
    if (PyModule_AddObjectRef(m, "SetupError", SetupError) < 0 || PyModule_AddObject(m, "STEPS", steps) < 0)
        goto fail;
    steps = NULL;
    struct {
        const char *name;
        long long value;
    } consts[] = {
        {"MAX_RLIMITS", MAX_RLIMITS}, {"MAX_BINDS", MAX_BINDS}, {"MAX_MOUNT_OPS", MAX_MOUNT_OPS},
        {"MAX_MASKS", MAX_MASKS}, {"MASK_FILE", MASK_FILE}, {"MASK_DIR", MASK_DIR}, {"MASK_RDONLY", MASK_RDONLY},
        {"MASK_PIN", MASK_PIN},
        {"SPEC_ROOT_READONLY", SPEC_ROOT_READONLY}, {"MAX_LL_PATHS", MAX_LL_PATHS}, {"MAX_LL_PORTS", MAX_LL_PORTS}, {"OP_MKDIR", OP_MKDIR},
        {"OP_SYMLINK", OP_SYMLINK}, {"OP_FILE", OP_FILE}, {"OP_MOVE", OP_MOVE}, {"OP_PROC", OP_PROC},
        {"OP_TMPFS", OP_TMPFS}, {"STATUS_FD", STATUS_FD}, {"COMMAND_RULESET_FD", COMMAND_RULESET_FD}, {"INIT_FD", INIT_FD},
        {"STATUS_MAGIC", STATUS_MAGIC}, {"ZREQ_MAGIC", ZREQ_MAGIC}, {"ZREQ_MAX_BYTES", ZREQ_MAX_BYTES},
        {"SPEC_MAGIC", SPEC_MAGIC}, {"COMMAND_MAGIC", COMMAND_MAGIC}, {"SPEC_MOUNT_NS", SPEC_MOUNT_NS},
        {"SPEC_MOUNT_PROC", SPEC_MOUNT_PROC}, {"SPEC_NEW_ROOT", SPEC_NEW_ROOT},
        {"SPEC_LOOPBACK_UP", SPEC_LOOPBACK_UP}, {"SPEC_SETSID", SPEC_SETSID},
        {"SPEC_CREDS_LATE", SPEC_CREDS_LATE}, {"SPEC_DROP_GROUPS", SPEC_DROP_GROUPS},
        {"SPEC_DENY_SETGROUPS", SPEC_DENY_SETGROUPS}, {"SPEC_COMMAND_RULESET", SPEC_COMMAND_RULESET},
        {"SPEC_CGROUP_NS", SPEC_CGROUP_NS}, {"SPEC_BLANK_NETNS", SPEC_BLANK_NETNS},
        {"MAX_LIVE_SOCKETS", PUMP_MAX_LIVE_SOCKETS},
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++)
        if (PyModule_AddObject(m, consts[i].name, PyLong_FromLongLong(consts[i].value)) < 0)
            goto fail;
    if (add_layouts(m) < 0)
        goto fail;
    return m;
fail:
    Py_XDECREF(steps);
    Py_DECREF(m);
    return NULL;
}
