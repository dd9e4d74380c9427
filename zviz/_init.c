/*
 * zviz-init: pid 1 of a sandbox's pid namespace. Static, no libc (raw system
 * calls only), a few KB, so its exec costs little.
 *
 * Why an init at all: the kernel protects a pid namespace's init from signals
 * sent from inside the namespace unless it installed a handler, so a program
 * run as pid 1 cannot kill itself (os.kill(getpid(), SIGTERM), abort()), and
 * orphans would pile up as zombies. And the resource usage the kernel reports
 * for a process exec'd straight from the supervisor's address space includes
 * the supervisor's resident set (exec folds the old mm's high-water mark into
 * ru_maxrss); the program forked from this tiny init reports its own.
 *
 * argv: zviz-init STATUS_FD EXE ARG0 ARG1 ...; environ is the program's.
 * It forks, execs EXE in the child, reaps every process until the main child
 * has exited, writes {magic, wait status, rusage} to STATUS_FD, and exits.
 * When it exits the kernel kills whatever is left in the namespace.
 * It runs confined like the program (seccomp, Landlock): it needs only clone,
 * execve, wait4, write, close, exit_group.
 *
 * argv: zviz-init --zygote CTRL_FD RULESET_FD|-: the sandbox's zygote (see zygote_main
 * below): a long-lived pid 1 that forks a run-init for every command the
 * supervisor asks for over CTRL_FD, so that a command costs a fork and an
 * exec, not a new set of namespaces, a new root and a new seccomp filter.
 */
#include <asm/unistd.h>
#include <asm-generic/errno.h>
#include <linux/mman.h>
#include <linux/resource.h>
#include <linux/time.h>
#include <linux/sched.h>
#include <linux/signal.h>
#include <linux/wait.h>
#include <linux/fcntl.h>
#include <linux/poll.h>
#include <linux/uio.h>
#include <linux/prctl.h>

/* The socket ABI (x86_64), which the kernel's uapi headers leave to libc. */
struct zmsghdr {
    void *msg_name;
    int msg_namelen;
    struct iovec *msg_iov;
    unsigned long msg_iovlen;
    void *msg_control;
    unsigned long msg_controllen;
    unsigned int msg_flags;
};
struct zcmsghdr {
    unsigned long cmsg_len;
    int cmsg_level, cmsg_type;
};
#define ZCMSG_LEN(n) (sizeof(struct zcmsghdr) + (n))
#define ZCMSG_SPACE(n) (sizeof(struct zcmsghdr) + (((n) + 7) & ~7UL))
#define ZCMSG_DATA(c) ((unsigned char *)(c) + sizeof(struct zcmsghdr))
#define SOL_SOCKET_ 1
#define SCM_RIGHTS_ 1
#define MSG_NOSIGNAL_ 0x4000
#define MSG_CMSG_CLOEXEC_ 0x40000000

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif

typedef unsigned long size_t;

#include "_abi.h"
#include "_rsys.h"
#define sys6 rsys_x86_64
#define S1(n, a) sys6(n, (long)(a), 0, 0, 0, 0, 0)
#define S3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define S2(n, a, b) sys6(n, (long)(a), (long)(b), 0, 0, 0, 0)
#define S4(n, a, b, c, d) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define S5(n, a, b, c, d, e) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)


static size_t
slen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

static void
put(const char *s)
{
    S3(__NR_write, 2, s, slen(s));
}

static void __attribute__((noreturn))
die(long code)
{
    for (;;)
        S1(__NR_exit_group, code);
}

static int
parse_fd(const char *s)
{
    int v = 0;
    if (!*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (*s - '0');
    }
    return v;
}

static void
utoa(unsigned long v, char *buf)
{
    char tmp[24];
    int i = 0, j = 0;
    do {
        tmp[i++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (i)
        buf[j++] = tmp[--i];
    buf[j] = 0;
}

/* The program could not be forked: say why on stderr, exit 125. EAGAIN is
 * RLIMIT_NPROC (the policy's limits.processes, counted for the sandbox's
 * user) far more often than the host's own limits. (A warm snippet's pid 1
 * says the same: zviz/_stage.c child_warm.) */
static void __attribute__((noreturn))
clone_failed(long r)
{
    char num[24];
    utoa((unsigned long)-r, num);
    put("zviz-init: clone failed: errno ");
    put(num);
    put(r == -EAGAIN ? " (no process left: the policy's limits.processes, or the host's pid limits)\n" : "\n");
    die(125);
}

/* Exec the program; on failure say why on stderr and exit 127 (not found)
 * or 126 (anything else), like a shell. */
static void __attribute__((noreturn))
exec_program(const char *exe, char **argv, char **envp)
{
    long r = S3(__NR_execve, exe, argv, envp);
    char num[24];
    utoa((unsigned long)-r, num);
    put("zviz: cannot execute ");
    put(exe);
    put(": errno ");
    put(num);
    put(r == -ENOENT ? " (not found in the sandbox: is its directory, or its #! interpreter's, in the policy's paths?)\n"
        : (r == -EACCES ? " (permission denied: outside the policy's paths?)\n" : "\n"));
    die(r == -ENOENT ? 127 : 126);
}

/* ------------------------------------------------------------------ zygote
 *
 * One per sandbox, pid 1 of the sandbox's pid namespace, already inside every
 * layer (namespaces, the new root, Landlock, seccomp, no_new_privs), with no
 * rlimits of its own. For each request on CTRL_FD it forks a run-init and
 * returns that process's pidfd. The run-init forks the program, applies the
 * request's rlimits and stdio, execs it, reaps, and before it reports the
 * program's status kills whatever the program left behind: it is a child
 * subreaper, so every orphan of the run comes back to it. A run-init killed
 * before it could do that (kill() from the supervisor, or by the program
 * itself) leaves its orphans to the zygote, which kills every child of its own
 * that is not a live run-init. Each run-init first enters the command's own
 * Landlock domain, nested in the sandbox's, from the ruleset the stage left
 * on COMMAND_RULESET_FD (see run_init), so commands cannot reach each other.
 *
 * The zygote is not dumpable (its /proc entries are root's, and no process of
 * the sandbox may read its memory), ignores every signal from inside its pid
 * namespace (pid 1 without handlers), and exits when the supervisor hangs up;
 * its exit kills everything left in the namespace.
 *
 * The request and its reply: struct zreq in zviz/_abi.h.
 */
#define ZMAX_RUNS 4096

static char zbuf[ZREQ_MAX_BYTES];
static char *zptrs[ZREQ_MAX_PTRS];
static int zruns[ZMAX_RUNS];
static int nzruns;
static char kbuf[65536];

void *
memset(void *d, int c, size_t n)
{
    char *p = d;
    while (n--)
        *p++ = (char)c;
    return d;
}

void *
memcpy(void *d, const void *s, size_t n)
{
    char *p = d;
    const char *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

static int
in_runs(int pid)
{
    for (int i = 0; i < nzruns; i++)
        if (zruns[i] == pid)
            return i;
    return -1;
}

/* The processes of our pid namespace, from /proc: pid, parent, state. */
struct pinfo {
    int pid, ppid;
    char state;
    signed char under; /* -1 unknown, 0 no, 1 yes */
};
/* Grown by mmap as needed: a table with a fixed size would see only the
 * lowest pids, and another command holding that many (zombies cost nothing)
 * would hide this one's processes from the pass (found by review). */
static struct pinfo *procs;
static long procs_cap;

#define S6(n, a, b, c, d, e, f) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), (long)(f))

static int
grow_procs(long n)
{
    long cap = procs_cap ? procs_cap * 2 : 4096;
    long r = S6(__NR_mmap, 0, cap * sizeof(struct pinfo), PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r < 0 && r > -4096)
        return -1;
    struct pinfo *p = (struct pinfo *)r;
    if (procs) {
        memcpy(p, procs, n * sizeof(struct pinfo));
        S2(__NR_munmap, procs, procs_cap * sizeof(struct pinfo));
    }
    procs = p;
    procs_cap = cap;
    return 0;
}
static char dbuf[8192];

struct linux_dirent64_ {
    unsigned long long d_ino;
    long long d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static int
parse_uint(const char *s, const char **end)
{
    long v = 0;
    if (*s < '0' || *s > '9')
        return -1;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (*s++ - '0');
    *end = s;
    return v > 0x7fffffff ? -1 : (int)v;
}

/* Fill procs[] from /proc/N/stat ("N (comm) S PPID ..."). Returns the count
 * or -errno (also when the table could not grow: the scan would be partial). */
static long
scan_procs(void)
{
    long dfd = S4(__NR_openat, AT_FDCWD, "/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (dfd < 0)
        return dfd;
    long n = 0;
    for (;;) {
        long got = S3(__NR_getdents64, dfd, dbuf, sizeof dbuf);
        if (got <= 0)
            break;
        for (long off = 0; off < got;) {
            struct linux_dirent64_ *d = (struct linux_dirent64_ *)(dbuf + off);
            off += d->d_reclen;
            const char *e;
            int pid = parse_uint(d->d_name, &e);
            if (pid <= 0 || *e)
                continue;
            char path[32] = "/proc/";
            size_t i = 6;
            for (const char *c = d->d_name; *c && i < sizeof path - 6; c++)
                path[i++] = *c;
            memcpy(path + i, "/stat", 6);
            long fd = S4(__NR_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC, 0);
            if (fd < 0)
                continue; /* gone meanwhile */
            long r = S3(__NR_read, fd, kbuf, 511);
            S1(__NR_close, fd);
            if (r <= 0)
                continue;
            kbuf[r] = 0;
            char *rp = 0; /* the last ')': comm may hold anything */
            for (char *c = kbuf; *c; c++)
                if (*c == ')')
                    rp = c;
            if (!rp || rp[1] != ' ' || !rp[2] || rp[3] != ' ')
                continue;
            int ppid = parse_uint(rp + 4, &e);
            if (ppid < 0)
                continue;
            if (n == procs_cap && grow_procs(n) < 0) {
                S1(__NR_close, dfd);
                return -ENOMEM;
            }
            procs[n].pid = pid;
            procs[n].ppid = ppid;
            procs[n].state = rp[2];
            procs[n].under = -1;
            n++;
        }
    }
    S1(__NR_close, dfd);
    return n;
}

static int
is_stopped(char st)
{
    return st == 'T' || st == 't';
}

static int
is_dead(char st)
{
    return st == 'Z' || st == 'X' || st == 'x';
}

static int
in_list(int pid, const int *list, int n)
{
    for (int i = 0; i < n; i++)
        if (list[i] == pid)
            return 1;
    return 0;
}

/* Is procs[i] below `root` without passing through a pid of excl[]? */
static int
under(long n, long i, int root, const int *excl, int nexcl)
{
    long chain[64];
    int depth = 0, verdict = 0;
    long cur = i;
    for (long steps = 0;; steps++) {
        if (steps > n) { /* a cycle: pids reused between reads; next pass */
            verdict = 0;
            break;
        }
        if (procs[cur].under >= 0) {
            verdict = procs[cur].under;
            break;
        }
        if (in_list(procs[cur].pid, excl, nexcl) || procs[cur].pid == root) {
            verdict = 0; /* excluded, or root itself */
            procs[cur].under = 0;
            break;
        }
        if (depth < 64)
            chain[depth++] = cur;
        int pp = procs[cur].ppid;
        if (pp == root) {
            verdict = 1;
            break;
        }
        if (in_list(pp, excl, nexcl) || pp <= 0) {
            verdict = 0;
            break;
        }
        long next = -1;
        for (long j = 0; j < n; j++)
            if (procs[j].pid == pp) {
                next = j;
                break;
            }
        if (next < 0) { /* parent not seen (yet): unknown, try next pass */
            verdict = 0;
            break;
        }
        if (depth >= 64) { /* deeper than we remember: decide without memo */
            cur = next;
            continue;
        }
        cur = next;
    }
    for (int k = 0; k < depth; k++)
        procs[chain[k]].under = (signed char)verdict;
    return verdict;
}

static long
now_ns(void)
{
    struct timespec t = {0, 0};
    S2(__NR_clock_gettime, CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* How long a cleanup may keep freezing before it kills whatever is left,
 * stopped or not (a second command of the sandbox can SIGCONT what we stop,
 * found by review: 200 freeze rounds then took over 10 s). */
#define FREEZE_NS 100000000L /* 100 ms */

/* One pass over everything below `root` (ourselves), except the subtrees of
 * excl[]. The first pass SIGKILLs all of it. In later passes (something
 * survived: it forked meanwhile) what still runs is stopped first (SIGSTOP: a
 * stopped process cannot fork, so a tree that keeps growing at its leaves
 * cannot outpace us), then what was already stopped is killed: every pass
 * kills something, and SIGCONT cannot undo a SIGKILL. Past `deadline` (or 200
 * passes) everything is killed at once. Killing only our own children would not do: a chain whose leaf
 * forks each time a slot frees regrows at the bottom as fast as it is cut at
 * the top. Returns how many processes are below root, or -errno when /proc
 * cannot be read. */
static long
tree_pass(int root, const int *excl, int nexcl, int *rounds, long deadline)
{
    long n = scan_procs();
    if (n < 0)
        return n;
    long total = 0, running = 0;
    for (long i = 0; i < n; i++) {
        if (!under(n, i, root, excl, nexcl))
            continue;
        total++;
        if (!is_stopped(procs[i].state) && !is_dead(procs[i].state))
            running++;
    }
    /* The first pass kills everything it sees: what was left behind usually
     * sleeps, and one pass is all a cleanup starved of CPU by the sandbox's
     * other commands can count on. What a regrowing tree forked meanwhile
     * shows up in the next passes, which freeze first. */
    int freeze = *rounds > 0 && running > 0 && *rounds < 200 && now_ns() < deadline;
    (*rounds)++;
    for (long i = 0; i < n; i++) /* first stop what runs, before any slot frees */
        if (procs[i].under == 1 && freeze && !is_stopped(procs[i].state))
            S2(__NR_kill, procs[i].pid, SIGSTOP);
    for (long i = 0; i < n; i++)
        if (procs[i].under == 1 && (!freeze || is_stopped(procs[i].state)))
            S2(__NR_kill, procs[i].pid, SIGKILL);
    return total;
}

/* SIGKILL every child of ours (/proc/thread-self/children) but keep[]. */
static void
kill_children_direct(const int *keep, int nkeep)
{
    long fd = S4(__NR_openat, AT_FDCWD, "/proc/thread-self/children", O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0)
        return;
    long got = S3(__NR_read, fd, kbuf, sizeof kbuf - 1);
    S1(__NR_close, fd);
    if (got <= 0)
        return;
    kbuf[got] = 0;
    const char *s = kbuf, *e;
    while (*s) {
        int pid = parse_uint(s, &e);
        if (pid > 0) {
            if (!in_list(pid, keep, nkeep))
                S2(__NR_kill, pid, SIGKILL);
            s = e;
        } else {
            s++;
        }
    }
}

static void
pause_briefly(long ns)
{
    struct timespec t = {0, ns};
    S5(__NR_ppoll, 0, 0, &t, 0, 8);
}

/* ------------------------------------------------------------------ reaping
 *
 * One reaper for both kinds of init: wait_for_main (the program's status),
 * reap_exited (whatever has exited; a run-init leaves zruns), kill_below
 * (everything below us but the subtrees of live run-inits, until nothing of
 * it is left). */

/* Reap until `pid` has exited; its wait status and usage go to *rec. */
static void
wait_for_main(long pid, struct status_record *rec)
{
    memset(rec, 0, sizeof *rec);
    rec->magic = STATUS_MAGIC;
    for (;;) {
        int ws = 0;
        struct rusage ru;
        long w = S4(__NR_wait4, -1, &ws, __WALL, &ru);
        if (w == -EINTR)
            continue;
        if (w < 0)
            die(125); /* ECHILD before the main child: cannot happen */
        if (w == pid) {
            rec->wstatus = ws;
            rec->ru = ru;
            return;
        }
    }
}

/* Mirror the program's wait status as far as an exit code can. */
static void __attribute__((noreturn))
exit_like(int ws)
{
    if ((ws & 0x7f) == 0)
        die((ws >> 8) & 0xff);
    die(128 + (ws & 0x7f));
}

static int
killed_by_signal(int ws)
{
    return (ws & 0x7f) != 0 && (ws & 0x7f) != 0x7f;
}

/* Reap every child that has exited. Returns -1 when we have no child at all
 * (ECHILD), else 0. Sets *orphans when an exit may have left orphans to us:
 * a run-init that was killed (it could not clean up), or any other process. */
static int
reap_exited(int *orphans)
{
    for (;;) {
        int ws = 0;
        long w = S4(__NR_wait4, -1, &ws, __WALL | WNOHANG, 0);
        if (w == -EINTR)
            continue;
        if (w == 0)
            return 0;
        if (w < 0)
            return -1;
        int i = in_runs((int)w);
        if (i >= 0)
            zruns[i] = zruns[--nzruns];
        if (i < 0 || killed_by_signal(ws))
            *orphans = 1;
    }
}

/* Kill everything below `root` (ourselves) except the subtrees of the live
 * run-inits (zruns; a run-init has none), reaping as it dies, until nothing
 * of it is left: for a run-init, until it has no child at all (a live
 * descendant would have a live ancestor among its children); for the
 * zygote, until no process below it is outside a live run-init. See
 * tree_pass for why the whole tree, and how a regrowing one is stopped. */
static void
kill_below(int root)
{
    int rounds = 0, orphans = 0;
    long deadline = now_ns() + FREEZE_NS;
    for (;;) {
        if (reap_exited(&orphans) < 0)
            return; /* no child: nothing is below us */
        long left = tree_pass(root, zruns, nzruns, &rounds, deadline);
        if (left <= 0) {
            /* Nothing (visible) below us outside the run-inits, or /proc
             * unreadable: what is left are our own children, killed the
             * plain way. The zygote is done then (its run-inits stay). */
            kill_children_direct(zruns, nzruns);
            if (nzruns > 0)
                return;
        }
        pause_briefly(100000); /* let the signals land, the dead exit */
    }
}

static long
send_reply(int ctrl, int err, int fd)
{
    struct iovec iov = {&err, sizeof err};
    union {
        char buf[ZCMSG_SPACE(sizeof(int))];
        struct zcmsghdr align;
    } u;
    struct zmsghdr msg;
    memset(&msg, 0, sizeof msg);
    memset(&u, 0, sizeof u);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd >= 0) {
        msg.msg_control = u.buf;
        msg.msg_controllen = sizeof u.buf;
        struct zcmsghdr *c = (struct zcmsghdr *)u.buf;
        c->cmsg_level = SOL_SOCKET_;
        c->cmsg_type = SCM_RIGHTS_;
        c->cmsg_len = ZCMSG_LEN(sizeof(int));
        memcpy(ZCMSG_DATA(c), &fd, sizeof(int));
    }
    return S3(__NR_sendmsg, ctrl, &msg, MSG_NOSIGNAL_);
}

static int
lift(int fd)
{
    if (fd >= 10)
        return fd;
    long r = S3(__NR_fcntl, fd, F_DUPFD_CLOEXEC, 10);
    return r < 0 ? -1 : (int)r;
}

/* The program: child of a run-init. */
/* Every CPU (the kernel keeps the cpuset's): a command may have pinned the
 * zygote (same uid); what it hands on must not stay pinned. */
static void
widen_affinity(void)
{
    unsigned long all[16];
    for (int i = 0; i < 16; i++)
        all[i] = ~0UL;
    S3(__NR_sched_setaffinity, 0, sizeof all, all);
}

/* The ruleset of the commands' own Landlock domains (fd, -1: none); see run_init. */
static int command_ruleset = -1;
static int domain_err;

static void __attribute__((noreturn))
run_program(const struct zreq *q, int *fds, char *exe, char **argv, char **envp)
{
    unsigned long long none = 0;
    S4(__NR_rt_sigprocmask, SIG_SETMASK, &none, 0, 8);
    widen_affinity();
    for (int i = 0; i < 3; i++)
        if ((fds[i] = lift(fds[i])) < 0)
            die(126);
    for (int i = 0; i < 3; i++)
        if (S2(__NR_dup2, fds[i], i) < 0)
            die(126);
    if (domain_err) {
        put("zviz: cannot enter the command's own Landlock domain\n");
        die(126); /* fail closed: never run a command in its neighbours' domain */
    }
    S3(__NR_close_range, 3, ~0U, 0);
    for (unsigned i = 0; i < q->nrl; i++) {
        struct rlimit64 {
            unsigned long long cur, max;
        } v = {q->rl[i].cur, q->rl[i].max};
        if (S4(__NR_prlimit64, 0, q->rl[i].res, &v, 0) < 0) {
            put("zviz: cannot set a resource limit\n");
            die(126);
        }
    }
    exec_program(exe, argv, envp);
}

/* A run-init: child of the zygote, parent (and subreaper) of one run. */
static void __attribute__((noreturn))
run_init(const struct zreq *q, int *fds, char *exe, char **argv, char **envp, int self_pid)
{
    /* A session of its own: every process of the run inherits its session id,
     * the run-init's pid, which is how the supervisor tells whose a denied
     * call is in O(1) (getsid of the caller; see Sandbox._account_for). */
    S1(__NR_setsid, 0);
    S5(__NR_prctl, PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    /* The command's own Landlock domain, nested in the sandbox's, for this
     * run-init and everything of its run: no other command may ptrace it,
     * read its /proc/PID/{mem,environ,maps} or open its stdio through
     * /proc/PID/fd, and (Landlock ABI 6) it may signal and connect to
     * abstract unix sockets only within its own run. The zygote stays above
     * (it still reaps and kills). A failure is reported by the program's
     * side, on the program's stderr. */
    if (command_ruleset >= 0) {
        domain_err = S2(__NR_landlock_restrict_self, command_ruleset, 0) < 0;
        S1(__NR_close, command_ruleset);
    }
    long pid = S4(__NR_clone, SIGCHLD, 0, 0, 0);
    if (pid < 0)
        clone_failed(pid);
    if (pid == 0)
        run_program(q, fds, exe, argv, envp);
    for (int i = 0; i < 3; i++)
        S1(__NR_close, fds[i]);
    nzruns = 0; /* our copy of the zygote's table: none of them is ours */

    struct status_record rec;
    wait_for_main(pid, &rec);
    /* The program is gone: nothing it started may outlive the run. Orphans
     * come to us (subreaper), so while we have any child at all, something
     * of the run is left: kill the whole tree below us. */
    kill_below(self_pid);
    S3(__NR_write, fds[3], &rec, sizeof rec);
    exit_like(rec.wstatus);
}

/* Read exactly n bytes (the first read may carry fds). Returns 0, or -1 on
 * EOF/error. */
static int
read_full(int fd, char *p, long n)
{
    while (n > 0) {
        long r = S3(__NR_read, fd, p, n);
        if (r == -EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= r;
    }
    return 0;
}

/* The zygote, on SIGCHLD: reap; if that may have left orphans to us (a
 * run-init killed before it cleaned up, or an orphan that exited), kill
 * everything below us that is not below a live run-init. */
static void
reap(void)
{
    int orphans = 0;
    if (reap_exited(&orphans) == 0 && orphans)
        kill_below(1);
}

/* Handle one request. Returns -1 when the supervisor has hung up. */
static int
serve(int ctrl)
{
    struct zreq q;
    int fds[4] = {-1, -1, -1, -1};
    union {
        char buf[ZCMSG_SPACE(4 * sizeof(int))];
        struct zcmsghdr align;
    } u;
    struct iovec iov = {&q, sizeof q};
    struct zmsghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    long r;
    do
        r = S3(__NR_recvmsg, ctrl, &msg, MSG_CMSG_CLOEXEC_);
    while (r == -EINTR);
    if (r <= 0)
        return -1;
    int nfds = 0;
    if (msg.msg_controllen >= sizeof(struct zcmsghdr)) {
        struct zcmsghdr *c = (struct zcmsghdr *)u.buf;
        if (c->cmsg_level == SOL_SOCKET_ && c->cmsg_type == SCM_RIGHTS_) {
            nfds = (int)((c->cmsg_len - ZCMSG_LEN(0)) / sizeof(int));
            if (nfds > 4)
                nfds = 4;
            memcpy(fds, ZCMSG_DATA(c), nfds * sizeof(int));
        }
    }
    int err = 0;
    if (r < (long)sizeof q && read_full(ctrl, (char *)&q + r, sizeof q - r) < 0)
        err = -1;
    if (!err && q.magic == ZREQ_MAGIC && q.argc == 0 && q.envc == 0 && q.len == 0 && q.nrl == 0 && nfds == 0) {
        /* A barrier: reap now (a run-init the supervisor just killed is a
         * zombie already: its pidfd said so), so its orphans are dead before
         * the reply. */
        reap();
        send_reply(ctrl, 0, -1);
        return 0;
    }
    if (!err && (q.magic != ZREQ_MAGIC || q.nrl > MAX_RLIMITS || q.len == 0 || q.len > ZREQ_MAX_BYTES ||
                 (unsigned long)q.argc + q.envc + 2 > ZREQ_MAX_PTRS || q.argc == 0))
        err = -1;
    if (!err && read_full(ctrl, zbuf, q.len) < 0)
        err = -1;
    if (err) {
        /* a malformed stream cannot be resynchronised: hang up */
        for (int i = 0; i < nfds; i++)
            S1(__NR_close, fds[i]);
        return -1;
    }
    /* Split the strings: exe, argv..., envp...; all NUL-terminated, in bounds. */
    char *p = zbuf, *end = zbuf + q.len;
    unsigned want = 1 + q.argc + q.envc, k = 0;
    int bad = end[-1] != 0 || nfds != 4;
    char *exe = p;
    while (!bad && k < want) {
        if (p >= end) {
            bad = 1;
            break;
        }
        if (k > 0)
            zptrs[k - 1 + (k > q.argc ? 1 : 0)] = p;
        k++;
        while (*p)
            p++;
        p++;
    }
    if (bad) {
        send_reply(ctrl, -EINVAL, -1);
        for (int i = 0; i < nfds; i++)
            S1(__NR_close, fds[i]);
        return 0;
    }
    zptrs[q.argc] = 0;
    zptrs[q.argc + 1 + q.envc] = 0;
    if (nzruns >= ZMAX_RUNS) {
        send_reply(ctrl, -EAGAIN, -1);
        for (int i = 0; i < 4; i++)
            S1(__NR_close, fds[i]);
        return 0;
    }
    widen_affinity();
    int pidfd = -1;
    long pid = S5(__NR_clone, SIGCHLD | CLONE_PIDFD, 0, &pidfd, 0, 0);
    if (pid == 0) {
        S1(__NR_close, ctrl);
        run_init(&q, fds, exe, zptrs, zptrs + q.argc + 1, (int)S1(__NR_getpid, 0));
    }
    for (int i = 0; i < 4; i++)
        S1(__NR_close, fds[i]);
    if (pid < 0) {
        send_reply(ctrl, (int)pid, -1);
        return 0;
    }
    zruns[nzruns++] = (int)pid;
    /* the run-init's pid in this namespace: the id of its session, which
     * the supervisor matches against denials it saw before this reply */
    send_reply(ctrl, (int)pid, pidfd);
    S1(__NR_close, pidfd);
    return 0;
}

static void __attribute__((noreturn))
zygote_main(int ctrl, int ruleset)
{
    command_ruleset = ruleset;
    /* No process of the sandbox may read or write our memory through /proc
     * or ptrace; our run-inits inherit this until their program's exec. */
    S5(__NR_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0);
    unsigned long long chld = 1ULL << (SIGCHLD - 1);
    S4(__NR_rt_sigprocmask, SIG_BLOCK, &chld, 0, 8);
    long sfd = S4(__NR_signalfd4, -1, &chld, 8, O_CLOEXEC | O_NONBLOCK);
    if (sfd < 0)
        die(125);
    for (;;) {
        struct pollfd pf[2] = {{ctrl, POLLIN, 0}, {(int)sfd, POLLIN, 0}};
        long r = S3(__NR_poll, pf, 2, -1);
        if (r == -EINTR)
            continue;
        if (r < 0)
            die(125);
        if (pf[1].revents & POLLIN) {
            char info[128];
            while (S3(__NR_read, sfd, info, sizeof info) > 0)
                ;
            reap();
        }
        if (pf[0].revents & POLLIN) {
            if (serve(ctrl) < 0)
                die(0);
        } else if (pf[0].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            die(0);
        }
    }
}

__attribute__((used)) static void
init_main(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    char **envp = argv + argc + 1;

    if (argc == 4 && argv[1][0] == '-' && argv[1][1] == '-' && argv[1][2] == 'z') {
        int ctrl = parse_fd(argv[2]);
        int ruleset = parse_fd(argv[3]); /* "-" : no Landlock on this host */
        if (ctrl < 0)
            die(125);
        zygote_main(ctrl, ruleset);
    }
    if (argc < 4) {
        put("zviz-init: usage: zviz-init STATUS_FD EXE ARG0 [ARGS...]\n");
        die(125);
    }
    int status_fd = parse_fd(argv[1]);
    const char *exe = argv[2];

    /* As the zygote: no process of the sandbox may read our memory,
     * environment or maps through /proc, or ptrace us; the program is
     * dumpable again once it is exec'd. */
    S5(__NR_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0);
    long pid = S4(__NR_clone, SIGCHLD, 0, 0, 0);
    if (pid < 0)
        clone_failed(pid);
    if (pid == 0) {
        if (status_fd >= 0)
            S1(__NR_close, status_fd);
        exec_program(exe, argv + 3, envp);
    }
    /* The program's stdio is its own (as a run-init's, and a warm snippet's
     * pid 1's): a copy here kept its readers from seeing EOF, and its stdin's
     * writer from seeing EPIPE, when it closed them, until it exited. */
    for (int fd = 0; fd < 3; fd++)
        if (fd != status_fd)
            S1(__NR_close, fd);

    /* Reap everything; remember the main child's status and usage. */
    struct status_record rec;
    wait_for_main(pid, &rec);
    if (status_fd >= 0)
        S3(__NR_write, status_fd, &rec, sizeof rec);
    exit_like(rec.wstatus);
}

__asm__(".text\n"
        ".global _start\n"
        "_start:\n"
        "  xor %rbp, %rbp\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call init_main\n"
        "  hlt\n");
