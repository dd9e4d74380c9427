/*
 * zviz/_stage.c: the spawn path, in C (no Python here: the binding is
 * zviz/_stage_py.c).
 *
 * Why C: the child side of a spawn runs between clone() and execve(), in a copy of
 * a (possibly multi-threaded) Python process. Only async-signal-safe code may run
 * there, so no Python, no malloc, no locks: plain system calls over buffers that
 * the parent prepared before clone(). This is also what keeps the spawn cheap (no
 * interpreter start, no filter compilation: the seccomp program arrives as bytes).
 *
 * The plan is computed in Python (zviz/_plan.py, pure). This file only acts, in a
 * fixed order, like bubblewrap's main(): child_main below is the list of steps,
 * one function each, and the step names are those of ZVIZ_STEPS (zviz/_abi.h).
 *
 *   parent (stage_spawn)                child (child_main, pid 1 of its pid namespace)
 *   ------                              -----
 *   clone(CLONE_VM | CLONE_NEW* |       reset signal dispositions
 *         CLONE_PIDFD)                  1  sync: wait for "go" (id maps written)
 *   cgroup v2: put the child in the     1b cgroup v1: join the memory cgroup ("0" into
 *     memory cgroup (pid into              its `tasks`: see step_cgroup); then, in a
 *     cgroup.procs); write setgroups/      user namespace or as root, a cgroup namespace
 *     uid_map/gid_map                      rooted there
 *                                       2  clone the new root's sources (openat2 without
 *                                          symlinks, open_tree)
 *                                       3  credentials: setgroups, setresgid, setresuid
 *   send "go"                           4  mounts: a new root (tmpfs) holding only the
 *   read error pipe until EOF (exec)       policy's paths, a fresh /proc; pivot_root;
 *   receive the seccomp listener           masks (/proc...), the root made read-only
 *                                       5  loopback up (net ns), hostname (uts ns)
 *                                          (root without a user namespace: 3 runs here,
 *                                          after the mounts, which need root)
 *                                       6  session: setsid, pdeathsig
 *                                       7  no_new_privs, Landlock (rules, restrict; for a
 *                                          zygote, the ruleset of the commands' domains)
 *                                       8  fds: stdio, STATUS_FD, all else closed
 *                                       9  rlimits, chdir
 *                                       10 seccomp (last), hand the listener over
 *                                       11 execve (zviz-init by fd; it forks and execs
 *                                          the program, or serves as the zygote)
 *
 * A failing step writes {step, errno, index} to the error pipe and _exit(127);
 * the parent turns that into SetupError(step, errno, index).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/landlock.h>
#include <linux/magic.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include "_stage.h"

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
/* The mount API: glibc >= 2.36 declares it in <sys/mount.h> (which cannot be
 * mixed with <linux/mount.h>); the values are the kernel's. */
#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#define MOUNT_ATTR_RDONLY 0x00000001
#define MOUNT_ATTR_NOSUID 0x00000002
#define MOUNT_ATTR_NODEV 0x00000004
struct mount_attr {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#define SYS_move_mount 429
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif
/* openat2 (<linux/openat2.h> needs kernel headers >= 5.6) */
struct zviz_open_how {
    uint64_t flags, mode, resolve;
};
#ifndef RESOLVE_NO_MAGICLINKS
#define RESOLVE_NO_MAGICLINKS 0x02
#define RESOLVE_NO_SYMLINKS 0x04
#endif
#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif
/* Landlock: <linux/landlock.h> gives the access rights; the attribute
 * structs are declared here in their newest form (a build host's uapi
 * headers may predate ABI 4's port rules and ABI 6's scopes). */
#ifndef LANDLOCK_RULE_NET_PORT
#define LANDLOCK_RULE_NET_PORT 2
#endif
struct zviz_ruleset_attr {
    uint64_t handled_access_fs, handled_access_net, scoped;
};
struct zviz_path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));
struct zviz_net_port_attr {
    uint64_t allowed_access, port;
};

/*
 * Raw system calls for the child. The child shares the parent's memory
 * (CLONE_VM, like posix_spawn) to avoid copying page tables and the CoW faults
 * that a fork() inflicts on a large Python parent afterwards (measured: fork
 * path ~1.1 ms vs ~0.56 ms for a vfork spawn of /bin/true). Sharing memory
 * means sharing the parent thread's TLS, so the child must not write errno:
 * every call below goes through rsys(), which returns -errno and touches no
 * memory but its stack.
 */
#if defined(__x86_64__)
#define ZVIZ_CLONE_VM 1
#include "_rsys.h"
#define rsys rsys_x86_64
#else
#define ZVIZ_CLONE_VM 0
static inline long
rsys(long n, long a, long b, long c, long d, long e, long f)
{
    long r = syscall(n, a, b, c, d, e, f);
    return r < 0 ? -errno : r;
}
#endif
#define R0(n) rsys(n, 0, 0, 0, 0, 0, 0)
#define R1(n, a) rsys(n, (long)(a), 0, 0, 0, 0, 0)
#define R2(n, a, b) rsys(n, (long)(a), (long)(b), 0, 0, 0, 0)
#define R3(n, a, b, c) rsys(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define R4(n, a, b, c, d) rsys(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define R5(n, a, b, c, d, e) rsys(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

/* ---------------------------------------------------------------- child */

/* The child's own state: a copy of the plan (it renumbers fds, and must not
 * write to the parent's memory, shared by CLONE_VM) and what it makes. */
struct child {
    struct plan p;
    int srcfd[MAX_BINDS]; /* the cloned sources of the new root */
    int command_rs;       /* zygote: the commands' ruleset (-1: none) */
    int warm;             /* a warm spawn: init_fd is the caller's input, not a program (no Landlock rule) */
};

static void __attribute__((noreturn))
child_fail(const struct child *c, int step, long neg_errno, int index)
{
    struct child_error e = {step, (int)-neg_errno, index};
    R3(SYS_write, c->p.err_w, &e, sizeof e);
    R1(SYS_exit_group, 127);
    __builtin_unreachable();
}

#define CHECK(expr, step, index)                \
    do {                                        \
        long r_ = (expr);                       \
        if (r_ < 0)                             \
            child_fail(c, (step), r_, (index)); \
    } while (0)

struct kernel_sigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
};

/* 0. Handlers of the parent mean nothing here, and ignored signals would stay
 * ignored across exec (Python ignores SIGPIPE and SIGXFSZ): reset all. Every
 * signal is still blocked (the parent blocked them around clone). */
static void
reset_signals(void)
{
    struct kernel_sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    for (int s = 1; s < 65; s++)
        if (s != SIGKILL && s != SIGSTOP)
            R4(SYS_rt_sigaction, s, &dfl, NULL, 8);
}

/* 1. Wait until the parent has written our uid/gid maps. EOF: it died. Our
 * copy of the pipe's write end (the fd table was copied at clone) is closed
 * first: kept, no EOF would ever come, and a parent killed before "go" would
 * leave this child waiting forever, holding a copy of every fd the parent had
 * (its caller's stdio, a server's socket and lock). */
static void
step_sync(struct child *c)
{
    char go;
    R1(SYS_close, c->p.go_w);
    long r = R3(SYS_read, c->p.go_r, &go, 1);
    if (r != 1)
        child_fail(c, STEP_SYNC, r < 0 ? r : -EPIPE, -1);
}

/* 1b. Join the sandbox's memory cgroup (v1 hierarchies: `tasks`, opened by
 * the host), before any step that allocates on its behalf and long before
 * anything of the sandbox runs. The child moves itself because that is the
 * only migration the kernel does without write-locking the global
 * cgroup_threadgroup_rwsem: a write of "0" (the writer itself) to `tasks`
 * moves one thread and skips that lock (cgroup_procs_write_start), while a
 * pid written into `cgroup.procs` takes it, and taking it waits for an RCU
 * grace period whenever no other migration ran just before: ~10 ms of wall
 * time per sandbox, measured on 6.18, against ~0.04 ms. The child is one
 * thread, so moving the thread moves the process. The permission check is on
 * our credentials, still those the caller had at clone (root, or the
 * caller's uid, which owns us). */
static void
step_cgroup(struct child *c)
{
    if (c->p.cgroup_tasks_fd >= 0) {
        long r = R4(SYS_pwrite64, c->p.cgroup_tasks_fd, "0", 1, 0);
        if (r != 1)
            child_fail(c, STEP_CGROUP, r < 0 ? r : -EIO, -1);
    }
    /* Then a cgroup namespace rooted where we now are: the sandbox's
     * /proc/self/cgroup reads "/" for every hierarchy, not the host's cgroup
     * tree (its layout, the supervisor's pid in the cgroup's name). Needs
     * CAP_SYS_ADMIN in our user namespace: the plan asks for it only then. */
    if (c->p.cgroup_ns)
        CHECK(R1(SYS_unshare, CLONE_NEWCGROUP), STEP_CGROUP, -1);
}

/* Open a canonical host path that the host checked, following no symlink at
 * all (RESOLVE_NO_SYMLINKS): a link planted or swapped in after the check
 * makes the spawn fail (ELOOP) instead of redirecting what gets bound. */
static long
open_no_symlinks(const char *path)
{
    struct zviz_open_how how = {O_PATH | O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS};
    return R4(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
}

/* A clone of the mount tree at `path` (opened as above), for move_mount. */
static long
clone_source(const char *path)
{
    long fd = open_no_symlinks(path);
    if (fd < 0)
        return fd;
    long r = R3(SYS_open_tree, fd, "", OPEN_TREE_CLONE | O_CLOEXEC | AT_RECURSIVE | AT_EMPTY_PATH);
    R1(SYS_close, fd);
    return r;
}

/* 2. Clone the sources of the new root while still holding the caller's
 * identity: a root caller's paths below root-only directories stay
 * reachable. The sandbox later reaches only the bound directories
 * themselves, under its own uid. Nothing is covered yet. */
static void
step_clone_sources(struct child *c)
{
    const struct plan *p = &c->p;
    if (!(p->mount_ns && p->new_root))
        return;
    CHECK(R5(SYS_mount, NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL), STEP_MOUNT_PRIVATE, -1);
    for (int i = 0; i < p->n_src; i++) {
        CHECK(c->srcfd[i] = clone_source(p->src[i]), STEP_MOUNT_BIND, i);
        if (p->src_ro[i]) {
            struct mount_attr ma = {MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0};
            CHECK(R5(SYS_mount_setattr, c->srcfd[i], "", AT_EMPTY_PATH | AT_RECURSIVE, &ma, sizeof ma),
                  STEP_MOUNT_BIND, i);
        }
    }
}

/* 3. Credentials: drop supplementary groups (possible only where setgroups
 * is not denied, i.e. the parent had CAP_SETGID), then gid, then uid. Caps
 * inside the new user namespace survive this (the old uid was not the
 * namespace's root) and are lost at execve, since the new uid is not 0. */
static void
step_credentials(struct child *c)
{
    const struct plan *p = &c->p;
    if (p->drop_groups)
        CHECK(R2(SYS_setgroups, 0, NULL), STEP_SETGROUPS, -1);
    if (p->gid >= 0)
        CHECK(R3(SYS_setresgid, p->gid, p->gid, p->gid), STEP_SETRESGID, -1);
    if (p->uid >= 0)
        CHECK(R3(SYS_setresuid, p->uid, p->uid, p->uid), STEP_SETRESUID, -1);
}

static void
mount_op(struct child *c, int i)
{
    const struct plan *p = &c->p;
    const char *path = p->op_path[i];
    long r;
    switch (p->op_kind[i]) {
    case OP_MKDIR:
        r = R2(SYS_mkdir, path, 0755);
        if (r < 0 && r != -EEXIST)
            child_fail(c, STEP_MOUNT_OP, r, i);
        break;
    case OP_SYMLINK:
        CHECK(R2(SYS_symlink, p->op_arg[i], path), STEP_MOUNT_OP, i);
        break;
    case OP_FILE:
        CHECK(r = R4(SYS_openat, AT_FDCWD, path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644), STEP_MOUNT_OP, i);
        R1(SYS_close, r);
        break;
    case OP_MOVE:
        CHECK(R5(SYS_move_mount, c->srcfd[p->op_src[i]], "", AT_FDCWD, path, MOVE_MOUNT_F_EMPTY_PATH),
              STEP_MOUNT_OP, i);
        R1(SYS_close, c->srcfd[p->op_src[i]]);
        break;
    case OP_PROC:
        CHECK(R5(SYS_mount, "proc", path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL), STEP_MOUNT_PROC, i);
        break;
    case OP_TMPFS:
        CHECK(R5(SYS_mount, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, p->op_arg[i]), STEP_MOUNT_OP, i);
        break;
    }
}

/* After pivot_root: hide host facts (/proc/kcore, /proc/cmdline, boot id,
 * machine-id...) and make kernel knobs read-only, as container runtimes do.
 * Paths resolve inside the sandbox's own root. A path this kernel lacks is
 * skipped. Then the root tmpfs, made by the sandbox's own uid, becomes
 * read-only: it is not the sandbox's to change (chmod /, mkdir /x). Its
 * submounts (workdir, /tmp) keep their own flags. */
static void
apply_masks(struct child *c)
{
    const struct plan *p = &c->p;
    for (int i = 0; i < p->n_masks; i++) {
        const char *path = p->mask_path[i];
        long r = -EINVAL;
        switch (p->mask_kind[i]) {
        case MASK_FILE:
            r = R5(SYS_mount, "/dev/null", path, NULL, MS_BIND, NULL);
            break;
        case MASK_DIR:
            r = R5(SYS_mount, "tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "mode=0555,size=4k,nr_inodes=4");
            break;
        case MASK_RDONLY:
            r = R5(SYS_mount, path, path, NULL, MS_BIND | MS_REC, NULL);
            if (r == 0) {
                struct mount_attr ma = {MOUNT_ATTR_RDONLY, 0, 0, 0};
                r = R5(SYS_mount_setattr, AT_FDCWD, path, AT_RECURSIVE, &ma, sizeof ma);
            }
            break;
        case MASK_PIN: /* a mount point cannot be renamed or removed (EBUSY) */
            r = R5(SYS_mount, path, path, NULL, MS_BIND | MS_REC, NULL);
            break;
        }
        if (r == -ENOENT)
            continue;
        CHECK(r, STEP_MOUNT_MASK, i);
    }
    if (p->root_readonly) {
        struct mount_attr ma = {MOUNT_ATTR_RDONLY, 0, 0, 0};
        CHECK(R5(SYS_mount_setattr, AT_FDCWD, "/", 0, &ma, sizeof ma), STEP_ROOT_READONLY, -1);
    }
}

/* 4. Mounts, in our own mount namespace (never propagated to the host).
 * With a new root: the sandbox's whole filesystem is a fresh tmpfs holding
 * only what the plan lists (bind mounts of the policy's paths, the workdir,
 * a few device nodes, a fresh /proc, a private /tmp); everything else on the
 * host, its unix sockets included, does not exist in here. The tmpfs goes
 * on the staging directory, is populated, becomes / by pivot_root(".", "."),
 * and gets its masks. Without one: a fresh /proc over the host's. */
static void
step_mounts(struct child *c)
{
    const struct plan *p = &c->p;
    if (!p->mount_ns)
        return;
    if (p->new_root) {
        CHECK(R5(SYS_mount, "tmpfs", p->staging, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m,nr_inodes=4096"),
              STEP_MOUNT_ROOT, -1);
        CHECK(R1(SYS_chdir, p->staging), STEP_MOUNT_ROOT, -1);
        for (int i = 0; i < p->n_ops; i++)
            mount_op(c, i);
        CHECK(R2(SYS_pivot_root, ".", "."), STEP_PIVOT_ROOT, -1);
        CHECK(R2(SYS_umount2, ".", MNT_DETACH), STEP_PIVOT_ROOT, -1);
        CHECK(R1(SYS_chdir, "/"), STEP_PIVOT_ROOT, -1);
        apply_masks(c);
    } else if (p->mount_proc) {
        CHECK(R5(SYS_mount, NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL), STEP_MOUNT_PRIVATE, -1);
        CHECK(R5(SYS_mount, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL), STEP_MOUNT_PROC, -1);
    }
}

/* 5. The loopback interface up (a new network namespace: `loopback` mode),
 * the hostname (a new UTS namespace). */
static void
step_network_and_hostname(struct child *c)
{
    const struct plan *p = &c->p;
    if (p->loopback_up) {
        int s;
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        memcpy(ifr.ifr_name, "lo", 3);
        CHECK(s = R3(SYS_socket, AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), STEP_LOOPBACK, -1);
        CHECK(R3(SYS_ioctl, s, SIOCGIFFLAGS, &ifr), STEP_LOOPBACK, -1);
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        CHECK(R3(SYS_ioctl, s, SIOCSIFFLAGS, &ifr), STEP_LOOPBACK, -1);
        R1(SYS_close, s);
    }
    if (p->hostname)
        CHECK(R2(SYS_sethostname, p->hostname, strlen(p->hostname)), STEP_HOSTNAME, -1);
}

/* 6. A new session: no controlling terminal (no /dev/tty, no TIOCSTI into
 * the caller's terminal through it), and a process group of our own. Then
 * the parent-death signal, after the credential change, which clears it. If
 * the parent died before that, the go pipe has hung up: do not run an orphan. */
static void
step_session(struct child *c)
{
    const struct plan *p = &c->p;
    if (p->setsid)
        CHECK(R0(SYS_setsid), STEP_SETSID, -1);
    if (p->pdeathsig) {
        CHECK(R2(SYS_prctl, PR_SET_PDEATHSIG, p->pdeathsig), STEP_PDEATHSIG, -1);
        /* The hang-up alone is not enough: a child spawned while we set up
         * (spawns overlap: stage_spawn_start) holds a copy of the go pipe's
         * write end until its own exec. A pidfd of the parent process turns
         * readable at its death whoever holds what (-1: no pidfd_open). */
        struct pollfd pf[2] = {{p->go_r, POLLIN, 0}, {p->parent_pidfd, POLLIN, 0}};
        if (R3(SYS_poll, pf, 2, 0) > 0 && ((pf[0].revents & (POLLHUP | POLLERR)) || (pf[1].revents & POLLIN)))
            child_fail(c, STEP_PDEATHSIG, -ESRCH, -1);
    }
}

/* 7. no_new_privs (landlock_restrict_self needs it), then Landlock: a rule
 * per path (opened O_PATH inside the new root, following no symlink), execute and read on the
 * zviz-init fd, the port rules, restrict. For a zygote, then, the ruleset of
 * the commands' own domains (see below). */
static void
step_landlock(struct child *c)
{
    const struct plan *p = &c->p;
    CHECK(R5(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), STEP_NO_NEW_PRIVS, -1);
    if (p->landlock_abi <= 0)
        return;
    struct zviz_ruleset_attr attr = {p->ll_fs, p->ll_net, p->ll_scoped};
    /* the attribute's size by ABI: scoped came with 6, handled_access_net with 4 */
    size_t attr_size = p->landlock_abi >= 6 ? 24 : (p->landlock_abi >= 4 ? 16 : 8);
    int rs;
    CHECK(rs = R3(SYS_landlock_create_ruleset, &attr, attr_size, 0), STEP_LANDLOCK_CREATE, -1);
    for (int i = 0; i < p->n_ll_paths; i++) {
        int fd;
        CHECK(fd = open_no_symlinks(p->ll_path[i]), STEP_LANDLOCK_OPEN, i);
        struct zviz_path_beneath_attr pb = {p->ll_access[i], fd};
        CHECK(R4(SYS_landlock_add_rule, rs, LANDLOCK_RULE_PATH_BENEATH, &pb, 0), STEP_LANDLOCK_RULE, i);
        R1(SYS_close, fd);
    }
    if (p->init_fd >= 0 && !c->warm) {
        struct zviz_path_beneath_attr pb = {LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_READ_FILE, p->init_fd};
        CHECK(R4(SYS_landlock_add_rule, rs, LANDLOCK_RULE_PATH_BENEATH, &pb, 0), STEP_LANDLOCK_RULE, -1);
    }
    for (int i = 0; i < p->n_ll_ports; i++) {
        struct zviz_net_port_attr np = {p->ll_port_access[i], p->ll_port[i]};
        CHECK(R4(SYS_landlock_add_rule, rs, LANDLOCK_RULE_NET_PORT, &np, 0), STEP_LANDLOCK_PORT, i);
    }
    CHECK(R2(SYS_landlock_restrict_self, rs, 0), STEP_LANDLOCK_RESTRICT, -1);
    R1(SYS_close, rs);
    if (p->command_ruleset) {
        /* The zygote's run-inits put each command in a domain of its own,
         * nested in this one, from this rule-less ruleset: Landlock then
         * refuses ptrace and /proc/PID/{mem,environ,fd} across commands, and
         * on ABI 6 their signals and abstract unix connections. It handles
         * only making block devices, which the sandbox's domain already
         * refuses: the nesting, not the rights, is the point. Made here,
         * before seccomp: the filter allows zviz-init only the restrict. */
        struct zviz_ruleset_attr ca = {LANDLOCK_ACCESS_FS_MAKE_BLOCK, 0, p->ll_scoped};
        CHECK(c->command_rs = R3(SYS_landlock_create_ruleset, &ca, attr_size, 0), STEP_LANDLOCK_COMMAND, -1);
    }
}

/* Move fd *fd to a number >= 10 if it is below: fds 0..7 are about to be
 * overwritten, and none of the fds we still need may be among them. */
static long
lift_fd(int *fd)
{
    if (*fd < 0 || *fd >= 10)
        return 0;
    long r = R3(SYS_fcntl, *fd, F_DUPFD_CLOEXEC, 10);
    if (r < 0)
        return r;
    *fd = (int)r;
    return 0;
}

/* dup *fd onto `to` (flags: O_CLOEXEC or 0) and close the old number; with
 * no fd, close `to`: whatever the host left there does not survive. */
static long
place_fd(int *fd, int to, int flags)
{
    if (*fd < 0) {
        R1(SYS_close, to);
        return 0;
    }
    long r = R3(SYS_dup3, *fd, to, flags);
    if (r < 0)
        return r;
    R1(SYS_close, *fd);
    *fd = to;
    return 0;
}

/* 8. fds. Every fd we still need is first lifted above 9, then placed:
 * stdio on 0..2, the init's status pipe (or the zygote's control socket) on
 * STATUS_FD, the error pipe on 4, the listener socket on 5, zviz-init on 6
 * (4..6 close-on-exec: the error pipe closing at exec is how the parent
 * learns exec happened), the commands' ruleset on COMMAND_RULESET_FD;
 * everything else inherited from the host program is closed (for real, not
 * close-on-exec: RLIMIT_NOFILE below must not meet a host's high fds). */
static void
step_fds(struct child *c)
{
    struct plan *p = &c->p;
    int *lift[] = {&p->fd_in, &p->fd_out, &p->fd_err, &p->status_fd, &p->init_fd, &p->err_w, &p->listener_sock,
                   &c->command_rs};
    for (unsigned i = 0; i < sizeof lift / sizeof lift[0]; i++)
        CHECK(lift_fd(lift[i]), STEP_STDIO, (int)i);
    CHECK(R2(SYS_dup2, p->fd_in, 0), STEP_STDIO, 0);
    CHECK(R2(SYS_dup2, p->fd_out, 1), STEP_STDIO, 1);
    CHECK(R2(SYS_dup2, p->fd_err, 2), STEP_STDIO, 2);
    CHECK(place_fd(&p->status_fd, STATUS_FD, 0), STEP_STDIO, STATUS_FD);
    CHECK(place_fd(&p->err_w, 4, O_CLOEXEC), STEP_STDIO, 4);
    CHECK(place_fd(&p->listener_sock, 5, O_CLOEXEC), STEP_STDIO, 5);
    CHECK(place_fd(&p->init_fd, INIT_FD, O_CLOEXEC), STEP_STDIO, INIT_FD);
    CHECK(place_fd(&c->command_rs, COMMAND_RULESET_FD, 0), STEP_STDIO, COMMAND_RULESET_FD);
    CHECK(R3(SYS_close_range, COMMAND_RULESET_FD + 1, ~0U, 0), STEP_STDIO, -1);
}

/* 9. rlimits, now that no host fd is left (RLIMIT_NOFILE counts numbers);
 * the working directory. */
static void
step_rlimits_and_cwd(struct child *c)
{
    const struct plan *p = &c->p;
    for (int i = 0; i < p->n_rlimits; i++)
        CHECK(R4(SYS_prlimit64, 0, p->rl_res[i], &p->rl_val[i], NULL), STEP_RLIMIT, i);
    if (p->cwd)
        CHECK(R1(SYS_chdir, p->cwd), STEP_CHDIR, -1);
}

/* 9b. A warm child: what its exec would have done to its credentials. The
 * creator of a user namespace holds every capability in it, whatever its
 * uid; exec'ing a program without file capabilities as a non-root uid
 * clears the permitted and effective sets (the bounding set stays, as it
 * does across exec), so here they are cleared by hand, with the ambient
 * set. And exec makes the process dumpable again after a credential
 * change (its /proc files its own uid's). Before the filter, which may not
 * allow capset. */
static void
step_warm_creds(struct child *c)
{
    struct {
        uint32_t version;
        int pid;
    } head = {0x20080522 /* _LINUX_CAPABILITY_VERSION_3 */, 0};
    struct {
        uint32_t effective, permitted, inheritable;
    } none[2];
    memset(none, 0, sizeof none);
    CHECK(R5(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), STEP_DROP_CAPS, 0);
    CHECK(R2(SYS_capset, &head, none), STEP_DROP_CAPS, 1);
    CHECK(R5(SYS_prctl, PR_SET_DUMPABLE, 1, 0, 0, 0), STEP_DROP_CAPS, 2);
}

static long
send_fd(int sock, int fd)
{
    char dummy = 'L';
    struct iovec iov = {&dummy, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    long r = R3(SYS_sendmsg, sock, &msg, MSG_NOSIGNAL);
    return r == 1 ? 0 : (r < 0 ? r : -EIO);
}

/* 10. seccomp, last. The listener goes to the parent and is closed here: the
 * sandboxed program must never hold it. Signals are unblocked first so that
 * rt_sigprocmask need not be in anyone's allowlist. */
static void
step_seccomp(struct child *c)
{
    struct plan *p = &c->p;
    uint64_t none = 0;
    R4(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, 8);
    if (p->prog.len) {
        int lfd;
        CHECK(lfd = R3(SYS_seccomp, SECCOMP_SET_MODE_FILTER, p->seccomp_flags, &p->prog), STEP_SECCOMP, -1);
        if (p->seccomp_flags & SECCOMP_FILTER_FLAG_NEW_LISTENER) {
            CHECK(send_fd(p->listener_sock, lfd), STEP_SEND_LISTENER, -1);
            R1(SYS_close, lfd);
        }
    }
    if (p->listener_sock >= 0)
        R1(SYS_close, p->listener_sock);
}

/* 11. exec: zviz-init by its fd, or the program itself (probes). */
static void __attribute__((noreturn))
step_exec(struct child *c)
{
    const struct plan *p = &c->p;
    long r;
    if (p->init_fd >= 0)
        r = R5(SYS_execveat, p->init_fd, "", p->argv, p->envp, AT_EMPTY_PATH);
    else
        r = R3(SYS_execve, p->exe, p->argv, p->envp);
    child_fail(c, STEP_EXECVE, r, -1);
}

/* Every step but the exec: the sandbox is complete when this returns. */
static void
child_setup(struct child *c)
{
    reset_signals();
    step_sync(c);
    step_cgroup(c);
    step_clone_sources(c);
    if (!c->p.creds_late)
        step_credentials(c);
    step_mounts(c);
    step_network_and_hostname(c);
    if (c->p.creds_late) /* root without a user namespace: the mounts needed root */
        step_credentials(c);
    step_session(c);
    step_landlock(c);
    step_fds(c);
    step_rlimits_and_cwd(c);
    if (c->warm)
        step_warm_creds(c);
    step_seccomp(c);
}

static int
child_main(void *arg)
{
    struct child child = {.p = *(const struct plan *)arg, .command_rs = -1};
    child_setup(&child);
    step_exec(&child);
}

/* A warm sandbox's pid 1: reap until the snippet (`snippet`) has exited,
 * write its status record to STATUS_FD (as zviz-init's run-init does), and
 * exit like it; the pid namespace dies with us, and whatever the snippet
 * left with it. C, not the interpreter it is a copy of: no Python code runs
 * here, so none of the copied pages is touched, and there is no second
 * Python fork (PyOS_BeforeFork/AfterFork) per snippet. */
static void __attribute__((noreturn))
warm_init(long snippet)
{
    struct status_record rec;
    memset(&rec, 0, sizeof rec);
    rec.magic = STATUS_MAGIC;
    for (int fd = 0; fd <= 2; fd++)
        R1(SYS_close, fd); /* the snippet's stdio: its readers see EOF when it ends */
    R1(SYS_close, INIT_FD);
    for (;;) {
        int ws = 0;
        struct rusage ru;
        long w = R4(SYS_wait4, -1, &ws, __WALL, &ru);
        if (w == -EINTR)
            continue;
        if (w < 0)
            R1(SYS_exit_group, 125); /* ECHILD before the snippet: cannot happen */
        if (w == snippet) {
            rec.wstatus = ws;
            rec.ru = ru;
            break;
        }
    }
    R3(SYS_write, STATUS_FD, &rec, sizeof rec);
    R1(SYS_exit_group, (rec.wstatus & 0x7f) == 0 ? (rec.wstatus >> 8) & 0xff : 128 + (rec.wstatus & 0x7f));
    __builtin_unreachable();
}

/* A warm spawn's child (stage_spawn with warm set): a fork of the caller, not
 * a new program. Set up like any child, it closes the error pipe (no exec
 * closes it), which tells the parent it is ready, then forks the snippet and
 * becomes its pid 1 (warm_init). The snippet returns into the caller's code
 * inside the sandbox with fds 0-2, STATUS_FD and, on INIT_FD, what the
 * plan had as init_fd (the caller's input: no program is exec'd). pid 1 is
 * undumpable before the snippet exists, as zviz-init's zygote: nothing of the
 * sandbox reads its memory or maps through /proc; the snippet is dumpable
 * again, as an exec would have made it. (Where the policy's filter refuses
 * prctl, both stay as step_warm_creds left them: dumpable.)
 *
 * The error pipe is closed before anything here makes a call under the
 * filter that the stage does not always allow (STAGE_NEEDS, zviz/_bpf.py):
 * prctl, and libc's fork (its child calls set_robust_list). A call the
 * policy leaves out is a notification, and the parent hands the listener
 * to the supervisor only at the pipe's EOF: closed after them, the spawn
 * (and the fork server with it) waited for an answer that could not come.
 * So a failed fork is no set-up failure either: as zviz-init's, it is said
 * on the program's stderr and the status is exit 125 (the sandbox's own
 * limits.processes, RLIMIT_NPROC, is the usual cause, not the host's). */
static void
child_warm(struct plan *p)
{
    struct child child = {.p = *p, .command_rs = -1, .warm = 1};
    child_setup(&child);
    R1(SYS_close, child.p.err_w);
    long undumpable = R5(SYS_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0);
    /* libc's fork, not a raw clone: this child is a copy, not CLONE_VM, and
     * the snippet must have its own thread id in libc's thread descriptor
     * (pthread_getcpuclockid, recursive and robust mutexes read it); ours is
     * still the server's, from the raw clone above. */
    long snippet = fork();
    if (snippet < 0) {
        /* zviz-init's words and status (zviz/_init.c clone_failed: the cold
         * path's result); the host is not our parent and learns the status
         * from the record only */
        char msg[160];
        int e = errno;
        int n = snprintf(msg, sizeof msg, "zviz-init: clone failed: errno %d%s\n", e,
                         e == EAGAIN ? " (no process left: the policy's limits.processes, or the host's pid limits)" : "");
        struct status_record rec;
        memset(&rec, 0, sizeof rec);
        rec.magic = STATUS_MAGIC;
        rec.wstatus = 125 << 8;
        R3(SYS_write, 2, msg, n > 0 && n < (int)sizeof msg ? n : (int)sizeof msg - 1);
        R3(SYS_write, STATUS_FD, &rec, sizeof rec);
        R1(SYS_exit_group, 125);
    }
    if (snippet > 0)
        warm_init(snippet);
    if (undumpable == 0)
        R5(SYS_prctl, PR_SET_DUMPABLE, 1, 0, 0, 0);
}

/* ---------------------------------------------------------------- parent */

static int
write_file(const char *path, const char *data)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t n = strlen(data);
    ssize_t w = write(fd, data, n);
    int saved = errno;
    close(fd);
    errno = saved;
    return w == (ssize_t)n ? 0 : -1;
}

/* eBPF monitor: the child is tracked before it runs a single instruction of
 * its own (it waits for "go"), so nothing it does, and nothing it forks,
 * escapes the count. */
static int
track_child(int map_fd, uint32_t pid, uint32_t value)
{
    union {
        struct {
            uint32_t map_fd;
            uint32_t pad;
            uint64_t key;
            uint64_t value;
            uint64_t flags;
        } u;
        char raw[128];
    } attr;
    memset(&attr, 0, sizeof attr);
    attr.u.map_fd = (uint32_t)map_fd;
    attr.u.key = (uint64_t)(uintptr_t)&pid;
    attr.u.value = (uint64_t)(uintptr_t)&value;
    attr.u.flags = 0; /* BPF_ANY */
    return syscall(SYS_bpf, 2 /* BPF_MAP_UPDATE_ELEM */, &attr, sizeof attr) < 0 ? -1 : 0;
}

/* id maps: written by the parent, which holds the rights the child lacks
 * (mapping to a uid other than our own needs CAP_SETUID here). */
static int
write_id_maps(const struct parent_plan *pp, int pid, struct spawn_result *out)
{
    static const char *const what[] = {"setgroups", "uid_map", "gid_map"};
    const char *data[] = {pp->deny_setgroups ? "deny" : NULL, pp->uid_map, pp->gid_map};
    for (int i = 0; i < 3; i++) {
        if (!data[i])
            continue;
        snprintf(out->path, sizeof out->path, "/proc/%d/%s", pid, what[i]);
        if (write_file(out->path, data[i]) < 0) {
            out->failure = SPAWN_ID_MAP;
            out->what = what[i];
            out->err = errno;
            return -1;
        }
    }
    return 0;
}

static int
recv_fd(int sock)
{
    char ch;
    struct iovec iov = {&ch, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {0};
    int fd = -1;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    if (recvmsg(sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC) == 1) {
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        if (cm && cm->cmsg_type == SCM_RIGHTS)
            memcpy(&fd, CMSG_DATA(cm), sizeof(int));
    }
    return fd;
}

#define SPAWN_STACK_SIZE (256 * 1024)

static void spawn_start(struct plan *p, const struct parent_plan *pp, struct spawn_result *out,
                        struct spawn_pending *pend, int warm);

void
stage_spawn(struct plan *p, const struct parent_plan *pp, struct spawn_result *out, int warm)
{
    struct spawn_pending pend;
    spawn_start(p, pp, out, &pend, warm);
    if (out->failure == SPAWN_OK && !(warm && out->pid == 0))
        stage_spawn_finish(&pend, out);
}

void
stage_spawn_start(struct plan *p, const struct parent_plan *pp, struct spawn_result *out,
                  struct spawn_pending *pend)
{
    spawn_start(p, pp, out, pend, 0);
}

/* A pending child is named by its pidfd, never by its number: something
 * else may have reaped it (a host program's own waitpid(-1), _process.py),
 * and the number then be another process's, which a kill would hit and a
 * waitpid wait for. Reaped here, or by that other: dead either way (its
 * stack and plan are ours again). */
static void
pending_reap(const struct spawn_pending *pend)
{
    siginfo_t si;
    int r;
    do {
        r = waitid((idtype_t)P_PIDFD, (id_t)pend->pidfd, &si, WEXITED);
    } while (r < 0 && errno == EINTR);
    if (r < 0 && errno == EINVAL) /* (no P_PIDFD before Linux 5.4) */
        waitpid(pend->pid, NULL, 0);
}

void
stage_spawn_kill(const struct spawn_pending *pend)
{
    if (pend->pid > 0)
        syscall(SYS_pidfd_send_signal, pend->pidfd, SIGKILL, NULL, 0);
}

static void
pending_release(struct spawn_pending *pend)
{
    if (pend->errp >= 0)
        close(pend->errp);
    if (pend->sv >= 0)
        close(pend->sv);
    if (pend->pidfd >= 0)
        close(pend->pidfd);
    if (pend->go >= 0)
        close(pend->go);
    if (pend->stack != MAP_FAILED)
        munmap(pend->stack, SPAWN_STACK_SIZE);
    pend->pid = 0;
    pend->errp = pend->sv = pend->pidfd = pend->go = -1;
    pend->stack = MAP_FAILED;
}

void
stage_spawn_finish(struct spawn_pending *pend, struct spawn_result *out)
{
    struct child_error ce;
    ssize_t got;
    memset(out, 0, sizeof *out);
    out->pidfd = out->listener = -1;
    /* Exec (EOF: the CLOEXEC error pipe closed) or a failure report. */
    do {
        got = read(pend->errp, &ce, sizeof ce);
    } while (got < 0 && errno == EINTR);
    if (got != 0) {
        /* The child reported a failed step and exits 127: reap it here. */
        pending_reap(pend);
        if (got == (ssize_t)sizeof ce) {
            out->failure = SPAWN_STEP;
            out->step = ce.step;
            out->err = ce.err;
            out->index = ce.index;
        } else {
            out->failure = SPAWN_PROTOCOL;
            out->what = "short read from the setup error pipe";
        }
        pending_release(pend);
        return;
    }
    if (pend->sv >= 0 && (out->listener = recv_fd(pend->sv)) < 0) {
        out->failure = SPAWN_PROTOCOL;
        out->what = "seccomp listener was not received";
        stage_spawn_abort(pend);
        return;
    }
    out->pid = pend->pid;
    out->pidfd = pend->pidfd;
    pend->pidfd = -1;
    pending_release(pend);
}

void
stage_spawn_forget(struct spawn_pending *pend)
{
    pending_release(pend);
}

void
stage_spawn_abort(struct spawn_pending *pend)
{
    if (pend->pid > 0) {
        stage_spawn_kill(pend);
        pending_reap(pend);
    }
    pending_release(pend);
}

static void
spawn_start(struct plan *p, const struct parent_plan *pp, struct spawn_result *out, struct spawn_pending *pend,
            int warm)
{
    const size_t stack_size = SPAWN_STACK_SIZE;
    void *stack = MAP_FAILED;
    int go[2] = {-1, -1}, errp[2] = {-1, -1}, sv[2] = {-1, -1};
    int pidfd = -1, self_pidfd = -1;
    pid_t pid = -1;
    int host_ns = -1, in_blank = 0;

    memset(out, 0, sizeof *out);
    out->pidfd = out->listener = -1;
    out->pid = -1; /* (0: the warm child, returning inside the sandbox) */
    pend->pid = 0;
    pend->pidfd = pend->errp = pend->sv = pend->go = -1;
    pend->stack = MAP_FAILED;
    if (pipe2(go, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0)
        goto oserror;
    if ((p->seccomp_flags & SECCOMP_FILTER_FLAG_NEW_LISTENER) &&
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        goto oserror;
    p->go_r = go[0];
    p->go_w = go[1];
    /* (ours closed at once after the clone: the child's copy is its own) */
    p->parent_pidfd = self_pidfd = p->pdeathsig ? (int)syscall(SYS_pidfd_open, getpid(), 0) : -1;
    p->err_w = errp[1];
    p->listener_sock = sv[1];
    /* cgroup v1: the child joins by itself (step_cgroup); v2: we put it in. */
    p->cgroup_tasks_fd = -1;
    int parent_joins = pp->cgroup_fd >= 0;
    if (parent_joins) {
        struct statfs sf;
        if (fstatfs(pp->cgroup_fd, &sf) < 0)
            goto oserror;
        if (sf.f_type == CGROUP_SUPER_MAGIC) {
            p->cgroup_tasks_fd = pp->cgroup_fd;
            parent_joins = 0;
        }
    }

    /* SPEC_BLANK_NETNS: the child starts in the blank network namespace
     * (zviz/_netns.py), which this thread enters for the clone alone (a
     * network namespace is per thread) and leaves at once. Never the
     * caller's own: a mistake must fail the spawn, not share the host's. */
    if (pp->blank_netns) {
        struct stat ours, blank;
        if (pp->netns_fd < 0) {
            errno = EBADF;
            goto oserror;
        }
        host_ns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
        if (host_ns < 0 || fstat(host_ns, &ours) < 0 || fstat(pp->netns_fd, &blank) < 0)
            goto oserror;
        if (ours.st_dev == blank.st_dev && ours.st_ino == blank.st_ino) {
            errno = EINVAL;
            goto oserror;
        }
    }

    /* Block every signal across clone() so no handler runs in the child
     * copy; the child resets and unblocks. (And none runs on this thread
     * while it is in the blank namespace.) */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    if (pp->blank_netns) {
        /* first into its own (no move: the checks of the way back, so that a thread that could
         * not come back is refused here, not aborted below; zviz/_stage_py.c netns_enter) */
        if (setns(host_ns, CLONE_NEWNET) < 0 || setns(pp->netns_fd, CLONE_NEWNET) < 0) {
            int e = errno;
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            errno = e;
            goto oserror;
        }
        in_blank = 1;
    }
    if (warm) {
        /* fork-style: the child goes on in a copy of our memory (a warm
         * interpreter's; _warmboot.py) and returns from here inside the
         * sandbox. Raw clone, not fork(): the flags make the namespaces. */
        pid = syscall(SYS_clone, pp->clone_flags | CLONE_PIDFD | SIGCHLD, NULL, &pidfd, NULL, NULL);
        if (pid == 0) {
            child_warm(p);
            out->pid = 0;
            return;
        }
    } else {
#if ZVIZ_CLONE_VM
    /* posix_spawn-style: the child runs on its own stack in our memory until
     * execve. Not CLONE_VFORK: we must run (write the id maps) meanwhile.
     * The stack stays mapped until the error pipe says exec or failure. */
    stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack != MAP_FAILED)
        pid = clone(child_main, (char *)stack + stack_size,
                    (int)(pp->clone_flags | CLONE_VM | CLONE_PIDFD | SIGCHLD), p, &pidfd);
#else
    pid = syscall(SYS_clone, pp->clone_flags | CLONE_PIDFD | SIGCHLD, NULL, &pidfd, NULL, NULL);
    if (pid == 0)
        child_main(p); /* never returns */
#endif
    }
    int saved_errno = errno;
    if (in_blank) {
        if (setns(host_ns, CLONE_NEWNET) < 0)
            abort(); /* this thread must never go on in the blank namespace */
        in_blank = 0;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        errno = saved_errno;
        goto oserror;
    }
    close(go[0]);
    go[0] = -1;
    if (self_pidfd >= 0) { /* (not p's: the child copies the plan as it starts, and p stays as it was) */
        close(self_pidfd);
        self_pidfd = -1;
    }
    close(errp[1]);
    errp[1] = -1;
    if (sv[1] >= 0) {
        close(sv[1]);
        sv[1] = -1;
    }

    if (pp->track_map_fd >= 0 && track_child(pp->track_map_fd, (uint32_t)pid, pp->track_value) < 0) {
        out->failure = SPAWN_TRACK;
        out->err = errno;
        goto kill_child;
    }
    /* Memory cgroup (v2): the child joins it before it runs a single
     * instruction of its own (it waits for "go"), so everything it and its
     * descendants allocate (memfd, pipes, tmpfs, page cache) is charged. */
    if (parent_joins) {
        char num[24];
        int n = snprintf(num, sizeof num, "%d", (int)pid);
        if (pwrite(pp->cgroup_fd, num, n, 0) != n) {
            out->failure = SPAWN_CGROUP;
            out->err = errno;
            goto kill_child;
        }
    }
    if (write_id_maps(pp, pid, out) < 0)
        goto kill_child;

    if (write(go[1], "g", 1) != 1) {
        out->failure = SPAWN_OSERROR;
        out->err = errno;
        goto kill_child;
    }
    /* The child goes on by itself now: the caller waits for errp (finish). */
    pend->pid = pid;
    pend->pidfd = pidfd;
    pend->errp = errp[0];
    pend->sv = sv[0];
    pend->go = go[1];
    pend->stack = stack;
    pidfd = errp[0] = sv[0] = go[1] = -1;
    stack = MAP_FAILED;
    goto cleanup;

oserror:
    out->failure = SPAWN_OSERROR;
    out->err = errno;
    goto cleanup;
kill_child:
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
cleanup:
    if (host_ns >= 0) {
        if (in_blank && setns(host_ns, CLONE_NEWNET) < 0)
            abort();
        close(host_ns);
    }
    for (int i = 0; i < 2; i++) {
        if (go[i] >= 0)
            close(go[i]);
        if (errp[i] >= 0)
            close(errp[i]);
        if (sv[i] >= 0)
            close(sv[i]);
    }
    if (pidfd >= 0)
        close(pidfd);
    if (self_pidfd >= 0)
        close(self_pidfd);
    if (stack != MAP_FAILED)
        munmap(stack, stack_size);
}

/*
 * stage_kill_uid(uid, gid): SIGKILL every process whose real or saved uid is
 * `uid` (the sandbox's own host uid), from a child that takes that identity
 * and calls kill(-1, SIGKILL). The kernel walks the task list under its lock
 * and a fork racing with the walk fails (its parent has a fatal signal
 * pending: copy_process checks it after linking the child), so one pass
 * leaves no process of `uid` able to run user code again. The child shares
 * our memory (CLONE_VM | CLONE_VFORK: no page-table copy) and so makes raw
 * calls only. Returns 1 if something was signalled, 0 if nothing had that
 * uid, -errno on failure. Does not touch Python: call it without the GIL.
 */
struct killuid {
    long uid, gid, result;
};

static int
killuid_child(void *arg)
{
    struct killuid *k = arg;
    long r = R2(SYS_setgroups, 0, 0);
    if (r == 0)
        r = R3(SYS_setresgid, k->gid, k->gid, k->gid);
    if (r == 0)
        r = R3(SYS_setresuid, k->uid, k->uid, k->uid);
    if (r == 0) {
        r = R2(SYS_kill, -1, SIGKILL);
        r = r == 0 ? 1 : (r == -ESRCH ? 0 : r);
    }
    k->result = r;
    R1(SYS_exit, r == 1 ? 0 : r == 0 ? 1 : 2); /* for the fork() fallback, which shares no memory */
    return 0;
}

long
stage_kill_uid(unsigned int uid, unsigned int gid)
{
    struct killuid k = {uid, gid, -EINVAL};
    size_t stack_size = 64 * 1024;
    int status = 0;
    long err = 0;
    pid_t pid;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    void *stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) {
        pid = -1;
    } else {
#if ZVIZ_CLONE_VM
        pid = clone(killuid_child, (char *)stack + stack_size, CLONE_VM | CLONE_VFORK | SIGCHLD, &k);
#else
        pid = fork();
        if (pid == 0)
            killuid_child(&k);
#endif
    }
    if (pid < 0)
        err = -errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid > 0) {
        while (waitpid(pid, &status, __WALL) < 0 && errno == EINTR)
            ;
    }
    if (stack != MAP_FAILED)
        munmap(stack, stack_size);
    if (pid < 0)
        return err;
#if !ZVIZ_CLONE_VM
    k.result = !WIFEXITED(status) || WEXITSTATUS(status) > 1 ? -EPERM : WEXITSTATUS(status) == 0;
#endif
    return k.result;
}

/* ---------------------------------------------------------------- templates */

/*
 * A sandbox started from a template (zviz/_snapshot.py): an overlay mounted on
 * a root caller's fresh workdir, in the host's mount namespace, before the
 * sandbox's first spawn binds the workdir in (as the size-capped workdir's
 * tmpfs is). The lower layer is the template's files, read-only, nosuid,
 * nodev, through an idmapped mount that shows the files the template's owner
 * owns as the sandbox's own host uid/gid (a root caller's sandboxes each run
 * as a uid of their own); the upper and work directories are the workdir's.
 * The idmapping's user namespace is a helper's, made here and left at once:
 * the mount keeps what it needs. The template is opened following no symlink.
 * Nothing of the template is ever written: overlayfs writes only the upper.
 * Returns 0, or -errno with *step set (TEMPLATE_STEPS in zviz/_snapshot.py).
 */
#define TEMPLATE_HELPER_STACK (16 * 1024)

struct userns_helper {
    int r; /* the read end of a pipe: the helper lives until it hangs up */
    int w;
};

static int
userns_helper_child(void *arg)
{
    struct userns_helper *h = arg;
    char c;
    R1(SYS_close, h->w);
    R3(SYS_read, h->r, &c, 1);
    R1(SYS_exit, 0);
    return 0;
}

static int
write_map(pid_t pid, const char *what, unsigned int inside, unsigned int outside)
{
    char path[64], line[64];
    snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, what);
    int n = snprintf(line, sizeof line, "%u %u 1\n", inside, outside);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    long r = write(fd, line, (size_t)n);
    int err = r == n ? 0 : (r < 0 ? -errno : -EIO);
    close(fd);
    return err;
}

/* A user namespace fd mapping `owner` (uid and gid inside) to `uid`/`gid`
 * outside, from a helper child that lives in it until we hang up. The helper
 * is not waited for here (its exit takes a scheduler round trip: most of the
 * mount's cost on a busy host): its pid goes to *helper, for the caller to
 * reap later (at the sandbox's teardown). */
static long
idmap_userns(unsigned int owner_uid, unsigned int owner_gid, unsigned int uid, unsigned int gid,
             struct template_helper *helper)
{
    int pfd[2];
    helper->pid = -1;
    helper->stack = NULL;
    if (pipe2(pfd, O_CLOEXEC) < 0)
        return -errno;
    /* the helper's stack, and at its bottom what it reads: it may still run
     * when we return (CLONE_VM), so the mapping goes at its reaping
     * (stage_reap_template_helper), never before */
    size_t stack_size = TEMPLATE_HELPER_STACK;
    void *stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    struct userns_helper *h = stack == MAP_FAILED ? NULL : stack;
    if (h) {
        h->r = pfd[0];
        h->w = pfd[1];
    }
    long err = 0;
    pid_t pid = -1;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    if (stack == MAP_FAILED) {
        err = -ENOMEM;
    } else {
#if ZVIZ_CLONE_VM
        pid = clone(userns_helper_child, (char *)stack + stack_size, CLONE_NEWUSER | CLONE_VM | SIGCHLD, h);
#else
        pid = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, NULL, NULL, NULL, NULL);
        if (pid == 0)
            userns_helper_child(h);
#endif
        if (pid < 0)
            err = -errno;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    long fd = -1;
    if (pid > 0) {
        err = write_map(pid, "uid_map", owner_uid, uid);
        if (!err)
            err = write_map(pid, "gid_map", owner_gid, gid);
        if (!err) {
            char path[64];
            snprintf(path, sizeof path, "/proc/%d/ns/user", (int)pid);
            fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                err = -errno;
        }
    }
    close(pfd[1]); /* the helper exits */
    close(pfd[0]);
    if (pid > 0 && !err) {
        helper->pid = pid;
        helper->stack = stack;
    } else {
        if (pid > 0) {
            while (waitpid(pid, NULL, __WALL) < 0 && errno == EINTR)
                ;
        }
        if (stack != MAP_FAILED)
            munmap(stack, stack_size);
    }
    return err ? err : fd;
}

#ifndef SYS_fsopen
#define SYS_fsopen 430
#define SYS_fsconfig 431
#define SYS_fsmount 432
#endif
#define Z_FSOPEN_CLOEXEC 0x00000001
#define Z_FSCONFIG_SET_STRING 1
#define Z_FSCONFIG_SET_FD 5
#define Z_FSCONFIG_CMD_CREATE 6
#define Z_FSMOUNT_CLOEXEC 0x00000001
#define Z_MOUNT_ATTR_IDMAP 0x00100000

long
stage_mount_template(const char *lower, const char *upper, const char *work, const char *target,
                     unsigned int owner_uid, unsigned int owner_gid, unsigned int uid, unsigned int gid, int *step,
                     struct template_helper *helper)
{
    long ns = -1, dir = -1, tree = -1, fs = -1, mnt = -1, r;
#define TRY(expr, s)          \
    do {                      \
        *step = (s);          \
        if ((r = (expr)) < 0) \
            goto out;         \
    } while (0)
    TRY(ns = idmap_userns(owner_uid, owner_gid, uid, gid, helper), 0);
    TRY(dir = open_no_symlinks(lower), 1);
    TRY(tree = R3(SYS_open_tree, dir, "", OPEN_TREE_CLONE | O_CLOEXEC | AT_EMPTY_PATH), 2);
    struct mount_attr ma = {MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | Z_MOUNT_ATTR_IDMAP, 0, 0,
                            (uint64_t)ns};
    TRY(R5(SYS_mount_setattr, tree, "", AT_EMPTY_PATH, &ma, sizeof ma), 3);
    TRY(fs = R2(SYS_fsopen, "overlay", Z_FSOPEN_CLOEXEC), 4);
    TRY(R5(SYS_fsconfig, fs, Z_FSCONFIG_SET_FD, "lowerdir+", NULL, tree), 5);
    TRY(R5(SYS_fsconfig, fs, Z_FSCONFIG_SET_STRING, "upperdir", upper, 0), 6);
    TRY(R5(SYS_fsconfig, fs, Z_FSCONFIG_SET_STRING, "workdir", work, 0), 7);
    TRY(R5(SYS_fsconfig, fs, Z_FSCONFIG_CMD_CREATE, NULL, NULL, 0), 8);
    TRY(mnt = R3(SYS_fsmount, fs, Z_FSMOUNT_CLOEXEC, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV), 9);
    TRY(R5(SYS_move_mount, mnt, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH), 10);
    r = 0;
out:
#undef TRY
    if (ns >= 0)
        close((int)ns);
    if (dir >= 0)
        close((int)dir);
    if (tree >= 0)
        close((int)tree);
    if (fs >= 0)
        close((int)fs);
    if (mnt >= 0)
        close((int)mnt);
    return r;
}

/* Reap a template mount's helper (it exited long ago, or is about to) and
 * free its stack. Exactly once per helper. */
void
stage_reap_template_helper(const struct template_helper *helper)
{
    if (helper->pid > 0) {
        while (waitpid(helper->pid, NULL, __WALL) < 0 && errno == EINTR)
            ;
    }
    if (helper->stack)
        munmap(helper->stack, TEMPLATE_HELPER_STACK);
}
