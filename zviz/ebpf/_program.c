/*
 * zviz's eBPF monitor (compiled by bcc at load time).
 *
 * tracked: tgid/tid -> sandbox id. Seeded by the spawn path with a sandbox's
 * first process before it runs (zviz/_stage.c), counted from its first exec
 * (the stage's own setup calls are not the program's), grown at sched_process_fork
 * (which fires before the child runs), pruned at sched_process_exit.
 * stats: (sandbox, syscall, abi) -> calls and errors, counted at sys_exit,
 * which also sees calls the seccomp filter refused (seccomp runs before the
 * sys_enter tracepoint, so refused calls never show there).
 * errnos: (sandbox, syscall, errno) -> count.
 * events: a ring buffer of denials (EPERM, EACCES, ENOSYS results) and of
 * SIGSYS kills (the other-ABI calls the filter kills), with the syscall taken
 * from the task's registers.
 */
#include <linux/sched.h>

#define ABI_NATIVE 0
#define ABI_X32 1
#define ABI_IA32 2
#define X32_BIT 0x40000000
#define TS_COMPAT 0x0002
/* Seeded values carry this bit until the first exec (of zviz-init): the
 * stage's own setup calls (mount, pivot_root, landlock...) are not the
 * sandboxed program's and are not counted. */
#define PENDING 0x80000000
/* With a zygote (zviz/_zygote.py) the first exec is zviz-init's, which then
 * serves every command of the sandbox: its own calls, and its run-inits'
 * (forks that never exec), are not the programs'. SKIP_EXEC makes that exec
 * clear only itself; counting starts at each program's exec. */
#define SKIP_EXEC 0x40000000

struct key_t {
    u32 sid;
    u32 nr;
    u32 abi;
};
struct val_t {
    u64 calls;
    u64 errors;
};
struct ekey_t {
    u32 sid;
    u32 nr;
    u32 abi;
    s32 err;
};
struct event_t {
    u32 sid;
    u32 pid;
    u32 nr;
    u32 abi;
    s64 ret;
    u32 kind; /* 0: denied result, 1: SIGSYS kill, 2: path (trace), 3: sockaddr (trace) */
    u32 flags;
    char comm[16];
    char data[256];
};

BPF_HASH(tracked, u32, u32, 65536);
BPF_HASH(stats, struct key_t, struct val_t, 65536);
BPF_HASH(errnos, struct ekey_t, u64, 65536);
BPF_RINGBUF_OUTPUT(events, 256);
/* trace mode: 1 when `zviz trace` wants paths and endpoints too */
BPF_ARRAY(trace_on, u32, 1);

static __always_inline u32 abi_of(long id)
{
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    u32 status = 0;
    bpf_probe_read_kernel(&status, sizeof status, &t->thread_info.status);
    if (status & TS_COMPAT)
        return ABI_IA32;
    if (id & X32_BIT)
        return ABI_X32;
    return ABI_NATIVE;
}

TRACEPOINT_PROBE(raw_syscalls, sys_exit)
{
    u64 pt = bpf_get_current_pid_tgid();
    u32 tgid = pt >> 32;
    u32 *sid = tracked.lookup(&tgid);
    if (!sid || (*sid & PENDING))
        return 0;
    long id = args->id;
    if (id < 0)
        return 0;
    struct key_t k = {};
    k.sid = *sid;
    k.abi = abi_of(id);
    k.nr = id & ~X32_BIT;
    struct val_t zero = {};
    struct val_t *v = stats.lookup_or_try_init(&k, &zero);
    if (!v)
        return 0;
    __sync_fetch_and_add(&v->calls, 1);
    long ret = args->ret;
    if (ret < 0 && ret > -4096) {
        __sync_fetch_and_add(&v->errors, 1);
        struct ekey_t ek = {};
        ek.sid = k.sid;
        ek.nr = k.nr;
        ek.abi = k.abi;
        ek.err = -ret;
        u64 one = 0;
        u64 *c = errnos.lookup_or_try_init(&ek, &one);
        if (c)
            __sync_fetch_and_add(c, 1);
        if (ret == -1 /* EPERM */ || ret == -13 /* EACCES */ || ret == -38 /* ENOSYS */) {
            struct event_t *e = events.ringbuf_reserve(sizeof(struct event_t));
            if (e) {
                e->sid = k.sid;
                e->pid = tgid;
                e->nr = k.nr;
                e->abi = k.abi;
                e->ret = ret;
                e->kind = 0;
                bpf_get_current_comm(&e->comm, sizeof e->comm);
                events.ringbuf_submit(e, 0);
            }
        }
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent = args->parent_pid;
    u32 *sid = tracked.lookup(&parent);
    if (!sid) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        sid = tracked.lookup(&tgid);
        if (!sid)
            return 0;
    }
    u32 child = args->child_pid;
    u32 val = *sid;
    tracked.update(&child, &val);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *sid = tracked.lookup(&tgid);
    if (sid && (*sid & PENDING)) {
        u32 val = (*sid & SKIP_EXEC) ? (*sid & ~SKIP_EXEC) : (*sid & ~PENDING);
        tracked.update(&tgid, &val);
    }
    return 0;
}

/* A task dying inside an x32 or i386 system call was killed by the seccomp
 * filter (KILL_PROCESS on a foreign ABI): that exit has no signal to trace
 * (do_group_exit(SIGSYS) directly), so it is caught here, with the syscall
 * from the task's registers (orig_ax) and the ABI from its thread flags. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 pid = bpf_get_current_pid_tgid();
    u32 *sid = tracked.lookup(&pid);
    if (!sid) {
        u32 tg = bpf_get_current_pid_tgid() >> 32;
        sid = tracked.lookup(&tg);
    }
    if (sid && !(*sid & PENDING)) {
        struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
        long nr = -1;
        bpf_probe_read_kernel(&nr, sizeof nr, &regs->orig_ax);
        u32 abi = nr >= 0 ? abi_of(nr) : ABI_NATIVE;
        if (abi != ABI_NATIVE) {
            struct event_t *e = events.ringbuf_reserve(sizeof(struct event_t));
            if (e) {
                e->sid = *sid;
                e->pid = pid;
                e->abi = abi;
                e->nr = nr & ~X32_BIT;
                e->ret = 0;
                e->kind = 1;
                e->flags = 0;
                bpf_get_current_comm(&e->comm, sizeof e->comm);
                events.ringbuf_submit(e, 0);
            }
        }
    }
    /* The tgid key lives until the whole group is dead (a main thread may
     * exit before the others); a thread's own key goes with the thread. */
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (pid != tgid)
        tracked.delete(&pid);
    if (args->group_dead)
        tracked.delete(&tgid);
    return 0;
}

/* trace mode only: the paths the program opens and execs, and the addresses
 * it connects to (read at sys_enter, as the program passed them). Compiled in
 * only for `zviz trace` (-DZVIZ_TRACE): an enabled raw_syscalls tracepoint
 * costs every system call on the host, even one that returns at once. */
#ifdef ZVIZ_TRACE
TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    int zero = 0;
    u32 *on = trace_on.lookup(&zero);
    if (!on || !*on)
        return 0;
    long id = args->id;
    /* open 2, openat 257, execve 59, execveat 322, connect 42, mkdir 83,
     * mkdirat 258, unlink 87, unlinkat 263, rename 82, renameat2 316 */
    int path_arg = -1, kind = 2;
    if (id == 2 || id == 59 || id == 83 || id == 87 || id == 82)
        path_arg = 0;
    else if (id == 257 || id == 258 || id == 263 || id == 316 || id == 322)
        path_arg = 1;
    else if (id == 42) {
        path_arg = 1;
        kind = 3;
    } else
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *sid = tracked.lookup(&tgid);
    if (!sid || (*sid & PENDING))
        return 0;
    struct event_t *e = events.ringbuf_reserve(sizeof(struct event_t));
    if (!e)
        return 0;
    e->sid = *sid;
    e->pid = tgid;
    e->nr = id;
    e->abi = 0;
    e->ret = 0;
    e->kind = kind;
    /* the ctx may only be read at constant offsets */
    u64 a0 = args->args[0], a1 = args->args[1], a2 = args->args[2];
    e->flags = id == 2 ? a1 : (id == 257 ? a2 : 0);
    bpf_get_current_comm(&e->comm, sizeof e->comm);
    const void *ptr = (const void *)(path_arg == 0 ? a0 : a1);
    if (kind == 2)
        bpf_probe_read_user_str(e->data, sizeof e->data, ptr);
    else
        bpf_probe_read_user(e->data, 28, ptr);
    events.ringbuf_submit(e, 0);
    return 0;
}
#endif
