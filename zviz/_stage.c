/*
 * zviz._stage: the spawn path, in C.
 *
 * Why C: the child side of a spawn runs between clone() and execve(), in a copy of
 * a (possibly multi-threaded) Python process. Only async-signal-safe code may run
 * there, so no Python, no malloc, no locks: plain system calls over buffers that
 * the parent prepared before clone(). This is also what keeps the spawn cheap (no
 * interpreter start, no filter compilation: the seccomp program arrives as bytes).
 *
 * The plan is computed in Python (zviz/_plan.py, pure). This file only acts, in a
 * fixed order, like bubblewrap's main():
 *
 *   parent                              child (pid 1 of its pid namespace)
 *   ------                              -----
 *   clone(CLONE_VM | CLONE_NEW* |       reset signal dispositions
 *         CLONE_PIDFD)                  1  sync: wait for "go" (id maps written)
 *   join the memory cgroup (pid into    2  clone the new root's sources (openat2 without
 *     cgroup.procs), write setgroups/      symlinks, open_tree), then credentials:
 *     uid_map/gid_map                      setgroups, setresgid, setresuid
 *   send "go"                           3  mounts: / private; a new root (tmpfs) holding
 *   read error pipe until EOF (exec)       only the policy's paths, fresh /proc; pivot_root;
 *                                          masks (/proc...), the root made read-only
 *   receive the seccomp listener           loopback up (net ns), hostname
 *                                       4  setsid, pdeathsig
 *                                       5  no_new_privs, Landlock (rules, restrict)
 *                                       6  fds: stdio, init status pipe on 3, all else closed
 *                                       7  rlimits, chdir
 *                                       8  seccomp (last), hand the listener over, execve
 *                                          (zviz-init by fd; it forks and execs the program)
 *   (root without a user namespace: step 2 runs after step 3, which needs root.)
 *
 * A failing step writes {step, errno, index} to the error pipe and _exit(127);
 * the parent turns that into SandboxSetupError(step, path, errno).
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#include <grp.h>

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#define SYS_move_mount 429
#endif
#define OPEN_TREE_CLONE_ 1
#define AT_RECURSIVE_ 0x8000
#define MOVE_MOUNT_F_EMPTY_PATH_ 0x00000004
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
struct open_how_ {
    uint64_t flags, mode, resolve;
};
#define RESOLVE_NO_MAGICLINKS_ 0x02
#define RESOLVE_NO_SYMLINKS_ 0x04
#define MOUNT_ATTR_RDONLY_ 0x00000001
#define MOUNT_ATTR_NOSUID_ 0x00000002
#define MOUNT_ATTR_NODEV_ 0x00000004
struct mount_attr_ {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};
#define LL_EXECUTE (1ULL << 0)
#define LL_READ_FILE (1ULL << 2)
#define LL_MAKE_BLOCK (1ULL << 11)
#define LL_CREATE_RULESET_VERSION (1U << 0)
#define LL_RULE_PATH_BENEATH 1
#define LL_RULE_NET_PORT 2

struct ll_ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};
struct ll_path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));
struct ll_net_port_attr {
    uint64_t allowed_access;
    uint64_t port;
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

/* Step numbers: keep in sync with STEPS in zviz/_kernel.py. */
enum {
    STEP_SYNC = 1,
    STEP_MOUNT_PRIVATE,
    STEP_MOUNT_BIND,
    STEP_MOUNT_ROOT,
    STEP_MOUNT_OP,
    STEP_MOUNT_PROC,
    STEP_PIVOT_ROOT,
    STEP_LOOPBACK,
    STEP_HOSTNAME,
    STEP_SETGROUPS,
    STEP_SETRESGID,
    STEP_SETRESUID,
    STEP_RLIMIT,
    STEP_SETPGID,
    STEP_PDEATHSIG,
    STEP_LANDLOCK_CREATE,
    STEP_LANDLOCK_OPEN,
    STEP_LANDLOCK_RULE,
    STEP_LANDLOCK_PORT,
    STEP_LANDLOCK_RESTRICT,
    STEP_NO_NEW_PRIVS,
    STEP_STDIO,
    STEP_CHDIR,
    STEP_SECCOMP,
    STEP_SEND_LISTENER,
    STEP_EXECVE,
    STEP_MOUNT_MASK,
    STEP_ROOT_READONLY,
    STEP_LANDLOCK_COMMAND,
};

#define MAX_RLIMITS 16
#define MAX_SRC 64
#define MAX_OPS 256
enum { OP_MKDIR = 1, OP_SYMLINK, OP_FILE, OP_MOVE, OP_PROC, OP_TMPFS };
/* Masks over the assembled root (after pivot_root): host facts a container
 * runtime hides (MASK_FILE: /dev/null bound over it; MASK_DIR: an empty
 * read-only tmpfs; MASK_RDONLY: bound onto itself read-only). */
enum { MASK_FILE = 1, MASK_DIR, MASK_RDONLY };
#define MAX_MASKS 64
#define MAX_LL_PATHS 256
#define MAX_LL_PORTS 64
#define COMMAND_RULESET_FD 7 /* zviz/_linux.py COMMAND_RULESET_FD */

/* Everything the child needs, prepared by the parent before clone(). */
struct plan {
    char **argv;
    char **envp;
    const char *exe;
    const char *cwd;
    int fd_in, fd_out, fd_err;
    int init_fd;   /* O_PATH fd of zviz-init, exec'd by fd (-1: exec exe directly) */
    int status_fd; /* write end of the init's status pipe, placed on fd 3 */
    int go_r, err_w, listener_sock;
    int mount_ns, mount_proc, loopback_up, setsid, creds_late;
    int new_root;
    const char *staging;
    int n_src;
    const char *src[MAX_SRC];
    int src_ro[MAX_SRC];
    int n_ops;
    int op_kind[MAX_OPS];
    const char *op_path[MAX_OPS];
    const char *op_arg[MAX_OPS];
    int op_src[MAX_OPS];
    int n_masks;
    int mask_kind[MAX_MASKS];
    const char *mask_path[MAX_MASKS];
    int root_readonly;
    const char *hostname;
    int drop_groups;
    long uid, gid; /* -1: leave as is */
    int n_rlimits;
    int rl_res[MAX_RLIMITS];
    struct rlimit rl_val[MAX_RLIMITS];
    int landlock_abi;
    int command_ruleset; /* zygote: hand zviz-init a ruleset for one domain per command */
    struct ll_ruleset_attr ll_attr;
    int n_ll_paths;
    const char *ll_path[MAX_LL_PATHS];
    uint64_t ll_access[MAX_LL_PATHS];
    int n_ll_ports;
    uint64_t ll_port[MAX_LL_PORTS];
    uint64_t ll_port_access[MAX_LL_PORTS];
    struct sock_fprog prog;
    unsigned int seccomp_flags;
    int pdeathsig;
    int command_rs; /* the child's: the ruleset fd it made (-1: none) */
};

struct child_error {
    int32_t step;
    int32_t err;
    int32_t index;
};

static void __attribute__((noreturn))
child_fail(const struct plan *p, int step, long neg_errno, int index)
{
    struct child_error e = {step, (int32_t)-neg_errno, index};
    R3(SYS_write, p->err_w, &e, sizeof e);
    R1(SYS_exit_group, 127);
    __builtin_unreachable();
}

#define CHECK(expr, step, index)                  \
    do {                                          \
        long r_ = (expr);                         \
        if (r_ < 0)                               \
            child_fail(p, (step), r_, (index));   \
    } while (0)

struct kernel_sigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
};

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
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    long r = R3(SYS_sendmsg, sock, &msg, MSG_NOSIGNAL);
    return r == 1 ? 0 : (r < 0 ? r : -EIO);
}

static void
set_creds(const struct plan *p)
{
    if (p->drop_groups)
        CHECK(R2(SYS_setgroups, 0, NULL), STEP_SETGROUPS, -1);
    if (p->gid >= 0)
        CHECK(R3(SYS_setresgid, p->gid, p->gid, p->gid), STEP_SETRESGID, -1);
    if (p->uid >= 0)
        CHECK(R3(SYS_setresuid, p->uid, p->uid, p->uid), STEP_SETRESUID, -1);
}

/* Move fd *fd to a number >= 10 if it is below: fds 0..3 are about to be
 * overwritten with dup2 (stdio and the init status pipe), and none of the fds
 * we still need may be among them. */
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

/* dup2 *fd onto `to` (if it is in use) with close-on-exec, and close the old number. */
static long
place_fd(int *fd, int to)
{
    if (*fd < 0) {
        R1(SYS_close, to); /* whatever the host left there does not survive */
        return 0;
    }
    long r = R3(SYS_dup3, *fd, to, O_CLOEXEC);
    if (r < 0)
        return r;
    R1(SYS_close, *fd);
    *fd = to;
    return 0;
}

/* Open a canonical host path that the host checked, following no symlink at
 * all (RESOLVE_NO_SYMLINKS): a link planted or swapped in after the check
 * makes the spawn fail (ELOOP) instead of redirecting what gets bound. */
static long
open_no_symlinks(const char *path)
{
    struct open_how_ how = {O_PATH | O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS_ | RESOLVE_NO_MAGICLINKS_};
    return R4(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
}

/* A clone of the mount tree at `path` (opened as above), for move_mount. */
static long
clone_source(const char *path)
{
    long fd = open_no_symlinks(path);
    if (fd < 0)
        return fd;
    long r = R3(SYS_open_tree, fd, "", OPEN_TREE_CLONE_ | O_CLOEXEC | AT_RECURSIVE_ | AT_EMPTY_PATH);
    R1(SYS_close, fd);
    return r;
}

/* After pivot_root: hide host facts (/proc/kcore, /proc/cmdline, boot id,
 * machine-id...) and make kernel knobs read-only, as container runtimes do.
 * Paths resolve inside the sandbox's own root. A path this kernel lacks is
 * skipped. */
static void
apply_masks(const struct plan *p)
{
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
                struct mount_attr_ ma = {MOUNT_ATTR_RDONLY_, 0, 0, 0};
                r = R5(SYS_mount_setattr, AT_FDCWD, path, AT_RECURSIVE_, &ma, sizeof ma);
            }
            break;
        }
        if (r == -ENOENT)
            continue;
        CHECK(r, STEP_MOUNT_MASK, i);
    }
    /* The root tmpfs was made by the sandbox's own uid: read-only, it is not
     * the sandbox's to change (chmod /, mkdir /x). Its submounts (workdir,
     * /tmp) keep their own flags. */
    if (p->root_readonly) {
        struct mount_attr_ ma = {MOUNT_ATTR_RDONLY_, 0, 0, 0};
        CHECK(R5(SYS_mount_setattr, AT_FDCWD, "/", 0, &ma, sizeof ma), STEP_ROOT_READONLY, -1);
    }
}

static int
child_main(void *arg)
{
    /* A private copy: the child adjusts fd numbers, and must not write to the
     * parent's memory (shared, CLONE_VM). */
    struct plan local = *(const struct plan *)arg;
    const struct plan *p = &local;
    char go;
    long r;

    /* Handlers of the parent mean nothing here, and ignored signals would stay
     * ignored across exec (Python ignores SIGPIPE and SIGXFSZ): reset all.
     * Every signal is still blocked (the parent blocked them around clone). */
    struct kernel_sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    for (int s = 1; s < 65; s++)
        if (s != SIGKILL && s != SIGSTOP)
            R4(SYS_rt_sigaction, s, &dfl, NULL, 8);

    /* 1. Wait until the parent has written our uid/gid maps. EOF: it died. */
    r = R3(SYS_read, p->go_r, &go, 1);
    if (r != 1)
        child_fail(p, STEP_SYNC, r < 0 ? r : -EPIPE, -1);

    /* 2. Credentials: drop supplementary groups (possible only where setgroups
     * is not denied, i.e. the parent had CAP_SETGID), then gid, then uid. Caps
     * inside the new user namespace survive this (the old uid was not the
     * namespace's root) and are lost at execve, since the new uid is not 0. */
    /* 2a. Clone the sources of the new root while still holding the caller's
     * identity: a root caller's paths below root-only directories stay
     * reachable. The sandbox later reaches only the bound directories
     * themselves, under its own uid. */
    int srcfd[MAX_SRC];
    if (p->mount_ns && p->new_root) {
        CHECK(R5(SYS_mount, NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL), STEP_MOUNT_PRIVATE, -1);
        for (int i = 0; i < p->n_src; i++) {
            CHECK(srcfd[i] = clone_source(p->src[i]), STEP_MOUNT_BIND, i);
            if (p->src_ro[i]) {
                struct mount_attr_ ma = {MOUNT_ATTR_RDONLY_ | MOUNT_ATTR_NOSUID_ | MOUNT_ATTR_NODEV_, 0, 0, 0};
                CHECK(R5(SYS_mount_setattr, srcfd[i], "", AT_EMPTY_PATH | AT_RECURSIVE_, &ma, sizeof ma),
                      STEP_MOUNT_BIND, i);
            }
        }
    }

    if (!p->creds_late)
        set_creds(p);

    /* 3. Mounts, in our own mount namespace (never propagated to the host).
     * With a new root: the sandbox's whole filesystem is a fresh tmpfs holding
     * only what the plan lists (bind mounts of the policy's paths, the
     * workdir, a few device nodes, a fresh /proc, a private /tmp); everything
     * else on the host, its unix sockets included, does not exist in here.
     * Sources are cloned (open_tree) before anything is covered, then the
     * tmpfs goes on the staging directory, is populated, and becomes / by
     * pivot_root(".", "."). */
    if (p->mount_ns) {
        if (p->new_root) {
            CHECK(R5(SYS_mount, "tmpfs", p->staging, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m,nr_inodes=4096"),
                  STEP_MOUNT_ROOT, -1);
            CHECK(R1(SYS_chdir, p->staging), STEP_MOUNT_ROOT, -1);
            for (int i = 0; i < p->n_ops; i++) {
                const char *path = p->op_path[i];
                switch (p->op_kind[i]) {
                case OP_MKDIR:
                    r = R2(SYS_mkdir, path, 0755);
                    if (r < 0 && r != -EEXIST)
                        child_fail(p, STEP_MOUNT_OP, r, i);
                    break;
                case OP_SYMLINK:
                    CHECK(R2(SYS_symlink, p->op_arg[i], path), STEP_MOUNT_OP, i);
                    break;
                case OP_FILE:
                    CHECK(r = R4(SYS_openat, AT_FDCWD, path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644), STEP_MOUNT_OP, i);
                    R1(SYS_close, r);
                    break;
                case OP_MOVE:
                    CHECK(R5(SYS_move_mount, srcfd[p->op_src[i]], "", AT_FDCWD, path, MOVE_MOUNT_F_EMPTY_PATH_),
                          STEP_MOUNT_OP, i);
                    R1(SYS_close, srcfd[p->op_src[i]]);
                    break;
                case OP_PROC:
                    CHECK(R5(SYS_mount, "proc", path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL),
                          STEP_MOUNT_PROC, i);
                    break;
                case OP_TMPFS:
                    CHECK(R5(SYS_mount, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, p->op_arg[i]),
                          STEP_MOUNT_OP, i);
                    break;
                }
            }
            CHECK(R2(SYS_pivot_root, ".", "."), STEP_PIVOT_ROOT, -1);
            CHECK(R2(SYS_umount2, ".", MNT_DETACH), STEP_PIVOT_ROOT, -1);
            CHECK(R1(SYS_chdir, "/"), STEP_PIVOT_ROOT, -1);
            apply_masks(p);
        } else if (p->mount_proc) {
            CHECK(R5(SYS_mount, NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL), STEP_MOUNT_PRIVATE, -1);
            CHECK(R5(SYS_mount, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL),
                  STEP_MOUNT_PROC, -1);
        }
    }
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
    /* Root without a user namespace: mounts need root's capabilities, which the
     * uid change drops, so the credentials come after them. */
    if (p->creds_late)
        set_creds(p);

    /* 4. Session, parent-death signal. PDEATHSIG goes after the credential
     * change, which clears it. If the parent died before that, the go pipe
     * has hung up: do not run an orphan. */
    /* A new session: no controlling terminal (no /dev/tty, no TIOCSTI into the
     * caller's terminal through it), and a process group of our own. */
    if (p->setsid)
        CHECK(R0(SYS_setsid), STEP_SETPGID, -1);
    if (p->pdeathsig) {
        CHECK(R2(SYS_prctl, PR_SET_PDEATHSIG, p->pdeathsig), STEP_PDEATHSIG, -1);
        struct pollfd pf = {p->go_r, POLLIN, 0};
        if (R3(SYS_poll, &pf, 1, 0) > 0 && (pf.revents & (POLLHUP | POLLERR)))
            child_fail(p, STEP_PDEATHSIG, -ESRCH, -1);
    }

    /* 5. no_new_privs (landlock_restrict_self needs it), then Landlock. */
    CHECK(R5(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), STEP_NO_NEW_PRIVS, -1);
    if (p->landlock_abi > 0) {
        size_t attr_size = p->landlock_abi >= 6 ? 24 : (p->landlock_abi >= 4 ? 16 : 8);
        int rs;
        CHECK(rs = R3(SYS_landlock_create_ruleset, &p->ll_attr, attr_size, 0), STEP_LANDLOCK_CREATE, -1);
        for (int i = 0; i < p->n_ll_paths; i++) {
            int fd;
            CHECK(fd = open_no_symlinks(p->ll_path[i]), STEP_LANDLOCK_OPEN, i);
            struct ll_path_beneath_attr pb = {p->ll_access[i], fd};
            CHECK(R4(SYS_landlock_add_rule, rs, LL_RULE_PATH_BENEATH, &pb, 0), STEP_LANDLOCK_RULE, i);
            R1(SYS_close, fd);
        }
        if (p->init_fd >= 0) {
            struct ll_path_beneath_attr pb = {LL_EXECUTE | LL_READ_FILE, p->init_fd};
            CHECK(R4(SYS_landlock_add_rule, rs, LL_RULE_PATH_BENEATH, &pb, 0), STEP_LANDLOCK_RULE, -1);
        }
        for (int i = 0; i < p->n_ll_ports; i++) {
            struct ll_net_port_attr np = {p->ll_port_access[i], p->ll_port[i]};
            CHECK(R4(SYS_landlock_add_rule, rs, LL_RULE_NET_PORT, &np, 0), STEP_LANDLOCK_PORT, i);
        }
        CHECK(R2(SYS_landlock_restrict_self, rs, 0), STEP_LANDLOCK_RESTRICT, -1);
        R1(SYS_close, rs);
        if (p->command_ruleset) {
            /* The zygote's run-inits put each command in a domain of its own,
             * nested in this one, from this (rule-less) ruleset: Landlock then
             * refuses ptrace and /proc/PID/{mem,environ,fd} across commands,
             * and on ABI 6 their signals and abstract unix connections. It
             * handles only making block devices, which the sandbox's domain
             * already refuses: the nesting, not the rights, is the point. */
            struct ll_ruleset_attr ca = {LL_MAKE_BLOCK, 0, p->ll_attr.scoped};
            CHECK(local.command_rs = R3(SYS_landlock_create_ruleset, &ca, attr_size, 0), STEP_LANDLOCK_COMMAND, -1);
        }
    }

    /* 6. fds. Every fd we still need is first lifted above 9, then placed:
     * stdio on 0..2, the init's status pipe on 3, the error pipe on 4, the
     * listener socket on 5, zviz-init on 6; everything else inherited from
     * the host program is closed (for real, not close-on-exec: RLIMIT_NOFILE
     * below must not meet a host's high fd numbers). 4..6 stay close-on-exec;
     * the error pipe closing at exec is how the parent learns exec happened. */
    CHECK(lift_fd(&local.fd_in), STEP_STDIO, 0);
    CHECK(lift_fd(&local.fd_out), STEP_STDIO, 1);
    CHECK(lift_fd(&local.fd_err), STEP_STDIO, 2);
    CHECK(lift_fd(&local.status_fd), STEP_STDIO, 3);
    CHECK(lift_fd(&local.init_fd), STEP_STDIO, 4);
    CHECK(lift_fd(&local.err_w), STEP_STDIO, 5);
    CHECK(lift_fd(&local.listener_sock), STEP_STDIO, 6);
    CHECK(lift_fd(&local.command_rs), STEP_STDIO, 7);
    CHECK(R2(SYS_dup2, p->fd_in, 0), STEP_STDIO, 0);
    CHECK(R2(SYS_dup2, p->fd_out, 1), STEP_STDIO, 1);
    CHECK(R2(SYS_dup2, p->fd_err, 2), STEP_STDIO, 2);
    if (p->status_fd >= 0)
        CHECK(R2(SYS_dup2, p->status_fd, 3), STEP_STDIO, 3);
    else
        R1(SYS_close, 3);
    CHECK(place_fd(&local.err_w, 4), STEP_STDIO, 4);
    CHECK(place_fd(&local.listener_sock, 5), STEP_STDIO, 5);
    CHECK(place_fd(&local.init_fd, 6), STEP_STDIO, 6);
    if (local.command_rs >= 0) { /* inherited by zviz-init: not close-on-exec */
        CHECK(R2(SYS_dup2, local.command_rs, COMMAND_RULESET_FD), STEP_STDIO, 7);
        R1(SYS_close, local.command_rs);
    } else {
        R1(SYS_close, COMMAND_RULESET_FD);
    }
    CHECK(R3(SYS_close_range, COMMAND_RULESET_FD + 1, ~0U, 0), STEP_STDIO, -1);

    /* 7. rlimits, now that no host fd is left (RLIMIT_NOFILE counts numbers). */
    for (int i = 0; i < p->n_rlimits; i++)
        CHECK(R4(SYS_prlimit64, 0, p->rl_res[i], &p->rl_val[i], NULL), STEP_RLIMIT, i);
    if (p->cwd)
        CHECK(R1(SYS_chdir, p->cwd), STEP_CHDIR, -1);

    /* 8. seccomp, last. The listener goes to the parent and is closed here: the
     * sandboxed program must never hold it. Signals are unblocked first so that
     * rt_sigprocmask need not be in anyone's allowlist. */
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
    if (p->init_fd >= 0)
        r = R5(SYS_execveat, p->init_fd, "", p->argv, p->envp, AT_EMPTY_PATH);
    else
        r = R3(SYS_execve, p->exe, p->argv, p->envp);
    child_fail(p, STEP_EXECVE, r, -1);
}

/* ---------------- parent side ---------------- */

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

static char **
seq_to_cstrings(PyObject *seq, PyObject **keep)
{
    /* Returns a NULL-terminated array pointing into bytes objects kept alive by *keep. */
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of bytes");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    char **out = PyMem_Calloc(n + 1, sizeof(char *));
    if (!out) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "expected bytes");
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
        out[i] = PyBytes_AS_STRING(item);
    }
    *keep = fast;
    return out;
}

/*
 * spawn(spec: dict) -> (pid, pidfd, listener_fd)
 *
 * Keys (all required unless noted; the Python side, _kernel.spawn, fills them):
 *   argv, envp: list[bytes]; exe, cwd: bytes
 *   stdin, stdout, stderr: int fds (> 2)
 *   clone_flags: int
 *   uid_map, gid_map: bytes or None; deny_setgroups: bool
 *   mount_proc, loopback_up, setsid, creds_late, drop_groups: bool; hostname: bytes or None
 *   uid, gid: int (-1 = keep)
 *   rlimits: list[(resource, soft, hard)]
 *   landlock_abi: int; ll_fs, ll_net, ll_scoped: int
 *   ll_paths: list[(bytes, access)]; ll_ports: list[(port, access)]
 *   bpf: bytes (may be empty); seccomp_flags: int
 *   pdeathsig: int
 */
static PyObject *
stage_spawn(PyObject *self, PyObject *args)
{
    PyObject *spec;
    if (!PyArg_ParseTuple(args, "O!:spawn", &PyDict_Type, &spec))
        return NULL;

    struct plan p;
    memset(&p, 0, sizeof p);
    PyObject *keep_argv = NULL, *keep_envp = NULL, *keep_paths = NULL;
    PyObject *keep_src = NULL, *keep_ops = NULL, *keep_masks = NULL;
    long cgroup_fd = -1;
    void *stack = MAP_FAILED;
    const size_t stack_size = 256 * 1024;
    PyObject *result = NULL;
    int go[2] = {-1, -1}, errp[2] = {-1, -1}, sv[2] = {-1, -1};
    int pidfd = -1;
    pid_t pid = -1;
    const char *uid_map = NULL, *gid_map = NULL;
    long track_map_fd = -1, track_value = 0;
    int deny_setgroups = 0;
    unsigned long clone_flags;

#define GET(name) PyObject *o_##name = PyDict_GetItemString(spec, #name); \
    if (!o_##name) { PyErr_SetString(PyExc_KeyError, #name); goto out; }
    GET(argv) GET(envp) GET(exe) GET(cwd) GET(stdin) GET(stdout) GET(stderr) GET(init_fd) GET(status_fd)
    GET(clone_flags) GET(uid_map) GET(gid_map) GET(deny_setgroups) GET(mount_ns) GET(mount_proc)
    GET(new_root) GET(staging) GET(binds) GET(mount_ops)
    GET(loopback_up) GET(setsid) GET(creds_late) GET(drop_groups) GET(hostname) GET(uid) GET(gid)
    GET(rlimits) GET(landlock_abi) GET(ll_fs) GET(ll_net) GET(ll_scoped) GET(ll_paths)
    GET(ll_ports) GET(bpf) GET(seccomp_flags) GET(pdeathsig)
#undef GET

    if (!(p.argv = seq_to_cstrings(o_argv, &keep_argv)))
        goto out;
    if (!(p.envp = seq_to_cstrings(o_envp, &keep_envp)))
        goto out;
    if (!(p.exe = PyBytes_AsString(o_exe)) || !(p.cwd = PyBytes_AsString(o_cwd)))
        goto out;
    p.fd_in = PyLong_AsLong(o_stdin);
    p.fd_out = PyLong_AsLong(o_stdout);
    p.fd_err = PyLong_AsLong(o_stderr);
    p.init_fd = PyLong_AsLong(o_init_fd);
    p.status_fd = PyLong_AsLong(o_status_fd);
    clone_flags = PyLong_AsUnsignedLong(o_clone_flags);
    if (o_uid_map != Py_None && !(uid_map = PyBytes_AsString(o_uid_map)))
        goto out;
    if (o_gid_map != Py_None && !(gid_map = PyBytes_AsString(o_gid_map)))
        goto out;
    deny_setgroups = PyObject_IsTrue(o_deny_setgroups);
    p.mount_ns = PyObject_IsTrue(o_mount_ns);
    p.mount_proc = PyObject_IsTrue(o_mount_proc);
    p.new_root = PyObject_IsTrue(o_new_root);
    if (o_staging != Py_None && !(p.staging = PyBytes_AsString(o_staging)))
        goto out;
    {
        keep_src = PySequence_Fast(o_binds, "binds");
        if (!keep_src)
            goto out;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(keep_src);
        if (n > MAX_SRC) {
            PyErr_SetString(PyExc_ValueError, "too many bind mounts (max 64)");
            goto out;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            const char *src;
            int ro;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(keep_src, i), "yp", &src, &ro))
                goto out;
            p.src[i] = src;
            p.src_ro[i] = ro;
        }
        p.n_src = n;
    }
    {
        keep_ops = PySequence_Fast(o_mount_ops, "mount_ops");
        if (!keep_ops)
            goto out;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(keep_ops);
        if (n > MAX_OPS) {
            PyErr_SetString(PyExc_ValueError, "too many mount operations (max 256)");
            goto out;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            int kind, src;
            const char *path, *arg;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(keep_ops, i), "iyyi", &kind, &path, &arg, &src))
                goto out;
            if (kind == OP_MOVE && (src < 0 || src >= p.n_src)) {
                PyErr_SetString(PyExc_ValueError, "mount op names a bind that does not exist");
                goto out;
            }
            p.op_kind[i] = kind;
            p.op_path[i] = path;
            p.op_arg[i] = arg;
            p.op_src[i] = src;
        }
        p.n_ops = n;
    }
    p.loopback_up = PyObject_IsTrue(o_loopback_up);
    p.setsid = PyObject_IsTrue(o_setsid);
    p.creds_late = PyObject_IsTrue(o_creds_late);
    p.drop_groups = PyObject_IsTrue(o_drop_groups);
    if (o_hostname != Py_None && !(p.hostname = PyBytes_AsString(o_hostname)))
        goto out;
    p.uid = PyLong_AsLong(o_uid);
    p.gid = PyLong_AsLong(o_gid);
    p.pdeathsig = PyLong_AsLong(o_pdeathsig);
    {
        PyObject *o_track = PyDict_GetItemString(spec, "track_map_fd");
        PyObject *o_tval = PyDict_GetItemString(spec, "track_value");
        if (o_track)
            track_map_fd = PyLong_AsLong(o_track);
        if (o_tval)
            track_value = PyLong_AsLong(o_tval);
    }
    {
        /* Optional keys (older callers, the probe's bare spec, omit them). */
        PyObject *o_cg = PyDict_GetItemString(spec, "cgroup_fd");
        PyObject *o_rro = PyDict_GetItemString(spec, "root_readonly");
        PyObject *o_masks = PyDict_GetItemString(spec, "masks");
        if (o_cg)
            cgroup_fd = PyLong_AsLong(o_cg);
        if (o_rro)
            p.root_readonly = PyObject_IsTrue(o_rro);
        if (o_masks) {
            keep_masks = PySequence_Fast(o_masks, "masks");
            if (!keep_masks)
                goto out;
            Py_ssize_t n = PySequence_Fast_GET_SIZE(keep_masks);
            if (n > MAX_MASKS) {
                PyErr_SetString(PyExc_ValueError, "too many masks (max 64)");
                goto out;
            }
            for (Py_ssize_t i = 0; i < n; i++) {
                int kind;
                const char *path;
                if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(keep_masks, i), "iy", &kind, &path))
                    goto out;
                p.mask_kind[i] = kind;
                p.mask_path[i] = path;
            }
            p.n_masks = n;
        }
    }
    p.landlock_abi = PyLong_AsLong(o_landlock_abi);
    p.command_rs = -1;
    {
        PyObject *o_crs = PyDict_GetItemString(spec, "command_ruleset");
        p.command_ruleset = o_crs ? PyObject_IsTrue(o_crs) : 0;
    }
    p.ll_attr.handled_access_fs = PyLong_AsUnsignedLongLong(o_ll_fs);
    p.ll_attr.handled_access_net = PyLong_AsUnsignedLongLong(o_ll_net);
    p.ll_attr.scoped = PyLong_AsUnsignedLongLong(o_ll_scoped);
    p.seccomp_flags = PyLong_AsUnsignedLong(o_seccomp_flags);
    if (PyErr_Occurred())
        goto out;

    {
        PyObject *fast = PySequence_Fast(o_rlimits, "rlimits");
        if (!fast)
            goto out;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
        if (n > MAX_RLIMITS) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "too many rlimits");
            goto out;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            int res;
            unsigned long long soft, hard;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "iKK", &res, &soft, &hard)) {
                Py_DECREF(fast);
                goto out;
            }
            p.rl_res[i] = res;
            p.rl_val[i].rlim_cur = soft;
            p.rl_val[i].rlim_max = hard;
        }
        p.n_rlimits = n;
        Py_DECREF(fast);
    }
    {
        keep_paths = PySequence_Fast(o_ll_paths, "ll_paths");
        if (!keep_paths)
            goto out;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(keep_paths);
        if (n > MAX_LL_PATHS) {
            PyErr_SetString(PyExc_ValueError, "too many landlock paths (max 256)");
            goto out;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            const char *path;
            unsigned long long acc;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(keep_paths, i), "yK", &path, &acc))
                goto out;
            p.ll_path[i] = path; /* points into a bytes object held by keep_paths */
            p.ll_access[i] = acc;
        }
        p.n_ll_paths = n;
    }
    {
        PyObject *fast = PySequence_Fast(o_ll_ports, "ll_ports");
        if (!fast)
            goto out;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
        if (n > MAX_LL_PORTS) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "too many landlock ports (max 64)");
            goto out;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            unsigned long long port, acc;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KK", &port, &acc)) {
                Py_DECREF(fast);
                goto out;
            }
            p.ll_port[i] = port;
            p.ll_port_access[i] = acc;
        }
        p.n_ll_ports = n;
        Py_DECREF(fast);
    }
    {
        char *buf;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(o_bpf, &buf, &len) < 0)
            goto out;
        if (len % sizeof(struct sock_filter) != 0) {
            PyErr_SetString(PyExc_ValueError, "bpf program length is not a multiple of 8");
            goto out;
        }
        p.prog.len = len / sizeof(struct sock_filter);
        p.prog.filter = (struct sock_filter *)buf;
    }

    if (pipe2(go, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    if (p.seccomp_flags & SECCOMP_FILTER_FLAG_NEW_LISTENER) {
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
    }
    p.go_r = go[0];
    p.err_w = errp[1];
    p.listener_sock = sv[1];

    {
        sigset_t all, old;
        int saved_errno = 0;
        struct child_error ce;
        ssize_t got;
        int listener = -1;

        Py_BEGIN_ALLOW_THREADS
        /* Block every signal across clone() so no Python-level handler (or any
         * handler) runs in the child copy; the child resets and unblocks. */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
#if ZVIZ_CLONE_VM
        /* posix_spawn-style: the child runs on its own stack in our memory until
         * execve. Not CLONE_VFORK: we must run (write the id maps) meanwhile.
         * The stack stays mapped until the error pipe says exec or failure. */
        stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED) {
            pid = -1;
        } else {
            pid = clone(child_main, (char *)stack + stack_size,
                        (int)(clone_flags | CLONE_VM | CLONE_PIDFD | SIGCHLD), &p, &pidfd);
        }
#else
        pid = syscall(SYS_clone, clone_flags | CLONE_PIDFD | SIGCHLD, NULL, &pidfd, NULL, NULL);
        if (pid == 0)
            child_main(&p); /* never returns */
#endif
        saved_errno = errno;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        Py_END_ALLOW_THREADS

        if (pid < 0) {
            errno = saved_errno;
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
        close(go[0]);
        go[0] = -1;
        close(errp[1]);
        errp[1] = -1;
        if (sv[1] >= 0) {
            close(sv[1]);
            sv[1] = -1;
        }

        /* eBPF monitor: the child is tracked before it runs a single
         * instruction of its own (it waits for "go"), so nothing it does, and
         * nothing it forks, escapes the count. */
        if (track_map_fd >= 0) {
            uint32_t key = (uint32_t)pid, val = (uint32_t)track_value;
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
            attr.u.map_fd = (uint32_t)track_map_fd;
            attr.u.key = (uint64_t)(uintptr_t)&key;
            attr.u.value = (uint64_t)(uintptr_t)&val;
            attr.u.flags = 0; /* BPF_ANY */
            if (syscall(SYS_bpf, 2 /* BPF_MAP_UPDATE_ELEM */, &attr, sizeof attr) < 0) {
                int e = errno;
                kill(pid, SIGKILL);
                waitpid(pid, NULL, 0);
                close(pidfd);
                pidfd = -1;
                PyObject *exc = Py_BuildValue("((siss))", "track", e, strerror(e), "bpf map");
                if (exc) {
                    PyErr_SetObject(PyExc_ChildProcessError, exc);
                    Py_DECREF(exc);
                }
                goto out;
            }
        }

        /* Memory cgroup: the child joins it before it runs a single
         * instruction of its own (it waits for "go"), so everything it and its
         * descendants allocate (memfd, pipes, tmpfs, page cache) is charged. */
        if (cgroup_fd >= 0) {
            char num[24];
            int n = snprintf(num, sizeof num, "%d", (int)pid);
            if (pwrite((int)cgroup_fd, num, n, 0) != n) {
                int e = errno;
                kill(pid, SIGKILL);
                waitpid(pid, NULL, 0);
                close(pidfd);
                pidfd = -1;
                PyObject *exc = Py_BuildValue("((siss))", "cgroup", e, strerror(e), "cgroup.procs");
                if (exc) {
                    PyErr_SetObject(PyExc_ChildProcessError, exc);
                    Py_DECREF(exc);
                }
                goto out;
            }
        }

        /* id maps: written by the parent, which holds the rights the child lacks
         * (mapping to a uid other than our own needs CAP_SETUID here). */
        char path[64];
        int map_err = 0;
        const char *map_step = NULL;
        if (deny_setgroups) {
            snprintf(path, sizeof path, "/proc/%d/setgroups", pid);
            if (write_file(path, "deny") < 0) { map_err = errno; map_step = "setgroups"; }
        }
        if (!map_err && uid_map) {
            snprintf(path, sizeof path, "/proc/%d/uid_map", pid);
            if (write_file(path, uid_map) < 0) { map_err = errno; map_step = "uid_map"; }
        }
        if (!map_err && gid_map) {
            snprintf(path, sizeof path, "/proc/%d/gid_map", pid);
            if (write_file(path, gid_map) < 0) { map_err = errno; map_step = "gid_map"; }
        }
        if (map_err) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            close(pidfd);
            pidfd = -1;
            PyObject *exc = Py_BuildValue("((siss))", map_step, map_err, strerror(map_err), path);
            if (exc) {
                PyErr_SetObject(PyExc_ChildProcessError, exc);
                Py_DECREF(exc);
            }
            goto out;
        }

        Py_BEGIN_ALLOW_THREADS
        got = write(go[1], "g", 1);
        /* Wait for exec (EOF: the CLOEXEC error pipe closed) or a failure report. */
        do {
            got = read(errp[0], &ce, sizeof ce);
        } while (got < 0 && errno == EINTR);
        if (got == 0 && sv[0] >= 0) {
            char c;
            struct iovec iov = {&c, 1};
            union {
                char buf[CMSG_SPACE(sizeof(int))];
                struct cmsghdr align;
            } u;
            struct msghdr msg = {0};
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            msg.msg_control = u.buf;
            msg.msg_controllen = sizeof u.buf;
            if (recvmsg(sv[0], &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC) == 1) {
                struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
                if (c && c->cmsg_type == SCM_RIGHTS)
                    memcpy(&listener, CMSG_DATA(c), sizeof(int));
            }
        }
        Py_END_ALLOW_THREADS

        if (got != 0) {
            /* The child reported a failed step and exits 127: reap it here. */
            waitpid(pid, NULL, 0);
            close(pidfd);
            pidfd = -1;
            if (got == (ssize_t)sizeof ce) {
                PyObject *exc = Py_BuildValue("((iii))", ce.step, ce.err, ce.index);
                if (exc) {
                    PyErr_SetObject(PyExc_ChildProcessError, exc);
                    Py_DECREF(exc);
                }
            } else {
                PyErr_SetString(PyExc_ChildProcessError, "short read from the setup error pipe");
            }
            goto out;
        }
        if (sv[0] >= 0 && listener < 0) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            close(pidfd);
            pidfd = -1;
            PyErr_SetString(PyExc_ChildProcessError, "seccomp listener was not received");
            goto out;
        }
        result = Py_BuildValue("(iii)", pid, pidfd, listener);
        pidfd = -1;
    }

out:
    if (go[0] >= 0) close(go[0]);
    if (go[1] >= 0) close(go[1]);
    if (errp[0] >= 0) close(errp[0]);
    if (errp[1] >= 0) close(errp[1]);
    if (sv[0] >= 0) close(sv[0]);
    if (sv[1] >= 0) close(sv[1]);
    if (pidfd >= 0) close(pidfd);
    PyMem_Free(p.argv);
    PyMem_Free(p.envp);
    Py_XDECREF(keep_argv);
    Py_XDECREF(keep_envp);
    Py_XDECREF(keep_paths);
    Py_XDECREF(keep_src);
    Py_XDECREF(keep_ops);
    Py_XDECREF(keep_masks);
    if (stack != MAP_FAILED)
        munmap(stack, stack_size);
    return result;
}

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

static PyMethodDef methods[] = {
    {"spawn", stage_spawn, METH_VARARGS, "Clone, set up the sandbox in the child, exec."},
    {"landlock_abi", stage_landlock_abi, METH_NOARGS, "Landlock ABI version, or -errno."},
    {"pidfd_getfd", stage_pidfd_getfd, METH_VARARGS, "Duplicate fd of the process behind pidfd."},
    {"notif_sizes", stage_notif_sizes, METH_NOARGS, "SECCOMP_GET_NOTIF_SIZES."},
    {"seccomp_action_avail", stage_seccomp_action_avail, METH_VARARGS, "SECCOMP_GET_ACTION_AVAIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "zviz._stage", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__stage(void)
{
    return PyModule_Create(&module);
}
