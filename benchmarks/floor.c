/*
 * benchmarks/floor.c: what the kernel alone charges for a fresh sandbox of
 * zviz's kind, with no Python and no supervisor: the floor under issue 12's
 * "host CPU of open + run + close <= bare + 1.0 ms".
 *
 * Each round, one of:
 *   bare     fork + execve("/bin/true") + waitpid
 *   sandbox  clone(user, pid, mount, ipc, uts, cgroup namespaces [+ net with
 *            --net]) + id maps written by the parent; in the child: a private
 *            mount table, a tmpfs root with /usr and /etc bound read-only and
 *            the merged-/usr links, /proc, a tmpfs /tmp, /dev/null,
 *            pivot_root, five /proc masks (zviz's: an empty read-only tmpfs
 *            each), no_new_privs, a Landlock ruleset (read /usr and /etc,
 *            write /tmp), a seccomp program of zviz's size (674
 *            instructions, every syscall allowed), execve("/bin/true");
 *            the parent waits for it.
 * Rounds alternate (blocks of 50), and the CPU is counted system-wide
 * (/proc/stat, so the kernel's workers freeing the namespaces count too)
 * and for the process tree (getrusage self + children).
 *
 * --template: each sandbox is cloned from a template process that holds
 * the user namespace and the built root, made once: new pid, mount (a copy
 * of the template's), ipc, uts and cgroup namespaces, a fresh /tmp, /proc
 * and masks, the same confinement (kernel objects kept from one sandbox to
 * the next; no --host-side; the tree CPU column then misses the sandboxes,
 * which are the template's children: read the system-wide one).
 * --host-side adds what zviz's host side makes per sandbox: a workdir
 * (mkdir, bound at /workspace, rmdir) and a v1 memory cgroup with a limit
 * (mkdir, limit, joined by the child through `tasks`, rmdir).
 *
 * --serve: no rounds of its own; after the warm-up, one sandbox (or, for
 * the byte 'b', one bare fork+exec) per byte read from stdin, a byte written
 * to stdout when it is done (benchmarks/cold.py --floor drives it from its
 * event loop: the kernel's floor as a row of the same run as zviz and bare).
 *
 *   cc -O2 -o /tmp/floor benchmarks/floor.c && /tmp/floor 2000 [--net] [--host-side] [--serve]
 *
 * Root (or unprivileged user namespaces), Landlock ABI >= 1, x86_64.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/landlock.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define STAGING "/tmp/zviz-floor-root"

static char *const true_argv[] = {"/bin/true", NULL};
static char *const no_env[] = {NULL};
static struct sock_fprog prog;
static int use_net, use_host_side, use_serve;
static int round_no;
static char cg_path[128], wd_path[128];

static void
die(const char *what)
{
    perror(what);
    _exit(127);
}

static void
build_filter(void)
{
    /* arch check, nr load, 670 compares that all allow, default allow: zviz's length */
    static struct sock_filter f[674];
    int n = 0;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 4);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0xc000003e, 1, 0);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 0);
    while (n < 673) {
        f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)(n + 1000), 673 - n - 1, 0);
        n++;
    }
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    prog.len = (unsigned short)n;
    prog.filter = f;
}

static void
ll_path(int ruleset, const char *path, unsigned long long access)
{
    struct landlock_path_beneath_attr pb = {.allowed_access = access};
    pb.parent_fd = open(path, O_PATH | O_CLOEXEC);
    if (pb.parent_fd < 0)
        die(path);
    if (syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &pb, 0) < 0)
        die("landlock_add_rule");
    close(pb.parent_fd);
}

static void
join_cgroup(void)
{
    /* zviz's v1 memory cgroup, joined by the child itself (tasks: no global lock) */
    char tasks[160];
    snprintf(tasks, sizeof tasks, "%s/tasks", cg_path);
    int fd = open(tasks, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, "0", 1) != 1)
        die("cgroup tasks");
    close(fd);
}

static void
mask_proc(void)
{
    const char *masks[] = {"/proc/acpi", "/proc/asound", "/proc/scsi", "/proc/pressure", "/proc/driver"};
    for (unsigned i = 0; i < 5; i++)
        if (mount("tmpfs", masks[i], "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "mode=0555,size=4k,nr_inodes=4") < 0 && errno != ENOENT)
            die("mask");
}

static void confine_and_exec(void);

/* The new root, in the caller's new mount namespace; `per_sandbox`: with
 * the workdir bound (the template mode binds it per sandbox instead). */
static void
build_root(int per_sandbox)
{
    if (mount(NULL, "/", NULL, MS_PRIVATE | MS_REC, NULL) < 0)
        die("private");
    if (mount("tmpfs", STAGING, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0)
        die("root tmpfs");
    if (chdir(STAGING) < 0)
        die("chdir");
    const char *dirs[] = {"usr", "etc", "proc", "tmp", "dev", "workspace"};
    for (unsigned i = 0; i < 6; i++)
        if (mkdir(dirs[i], 0755) < 0)
            die("mkdir");
    if (symlink("usr/bin", "bin") < 0 || symlink("usr/lib", "lib") < 0 || symlink("usr/lib64", "lib64") < 0)
        die("symlink");
    if (close(open("dev/null", O_CREAT | O_WRONLY | O_CLOEXEC, 0666)) < 0)
        die("dev/null");
    const char *ro[] = {"/usr", "/etc"};
    for (unsigned i = 0; i < 2; i++) {
        if (mount(ro[i], ro[i] + 1, NULL, MS_BIND | MS_REC, NULL) < 0)
            die("bind");
        if (mount(NULL, ro[i] + 1, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0)
            die("remount");
    }
    if (mount("/dev/null", "dev/null", NULL, MS_BIND, NULL) < 0)
        die("bind null");
    if (per_sandbox && use_host_side && mount(wd_path, "workspace", NULL, MS_BIND, NULL) < 0)
        die("bind workdir");
    if (mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        die("proc");
    if (mount("tmpfs", "tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
        die("tmp");
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        die("pivot_root");
    if (umount2(".", MNT_DETACH) < 0 || chdir("/") < 0)
        die("umount old root");
    if (per_sandbox) /* (a template's /proc stays whole: each sandbox mounts its own over it, and a
                      * masked one would make that mount too revealing to be allowed) */
        mask_proc();
}

static int
child(void *arg)
{
    int go = *(int *)arg;
    char c;
    if (read(go, &c, 1) != 1)
        _exit(126);
    if (use_host_side)
        join_cgroup();
    build_root(1);
    confine_and_exec();
    return 0;
}

static void
confine_and_exec(void)
{
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        die("no_new_privs");
    struct landlock_ruleset_attr ra = {.handled_access_fs = LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_READ_FILE |
                                                            LANDLOCK_ACCESS_FS_READ_DIR | LANDLOCK_ACCESS_FS_WRITE_FILE |
                                                            LANDLOCK_ACCESS_FS_MAKE_REG};
    int rs = (int)syscall(SYS_landlock_create_ruleset, &ra, sizeof ra, 0);
    if (rs < 0)
        die("landlock_create_ruleset");
    ll_path(rs, "/usr", LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR);
    ll_path(rs, "/etc", LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR);
    ll_path(rs, "/tmp", ra.handled_access_fs);
    if (syscall(SYS_landlock_restrict_self, rs, 0) < 0)
        die("landlock_restrict_self");
    close(rs);
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
        die("seccomp");
    execve("/bin/true", true_argv, no_env);
    die("execve");
}

static void write_file(const char *path, const char *data);

/* The child's id maps: our uid and gid as its 0 (setgroups denied first). */
static void
write_maps(pid_t pid)
{
    char path[64], map[64];
    snprintf(path, sizeof path, "/proc/%d/setgroups", pid);
    write_file(path, "deny");
    snprintf(map, sizeof map, "0 %d 1", getuid());
    snprintf(path, sizeof path, "/proc/%d/uid_map", pid);
    write_file(path, map);
    snprintf(map, sizeof map, "0 %d 1", getgid());
    snprintf(path, sizeof path, "/proc/%d/gid_map", pid);
    write_file(path, map);
}

static int use_template, req_w = -1, done_r = -1;
static pid_t template_pid = -1;

/* --template: a sandbox made from a template that holds the user namespace
 * and the built root (made once): a clone into new pid, mount (a copy of
 * the template's), ipc, uts and cgroup namespaces, a fresh /tmp, /proc and
 * its masks, the workdir bound, then the same confinement and exec. */
static int
from_template(void *arg)
{
    (void)arg;
    if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
        die("fresh tmp");
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        die("fresh proc");
    mask_proc();
    confine_and_exec();
    return 0;
}

static int
template_main(void *arg)
{
    int *fds = arg; /* go, requests, answers */
    char c;
    if (read(fds[0], &c, 1) != 1)
        _exit(126);
    build_root(0);
    static char stack[64 * 1024];
    int n;
    while (read(fds[1], &n, sizeof n) == sizeof n) {
        snprintf(wd_path, sizeof wd_path, "/tmp/zviz-floor-wd-%d", n);
        snprintf(cg_path, sizeof cg_path, "/sys/fs/cgroup/memory/zviz-floor-%d", n);
        pid_t pid = clone(from_template, stack + sizeof stack,
                          CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP | SIGCHLD, NULL);
        int ws = -1;
        if (pid > 0)
            waitpid(pid, &ws, 0);
        if (write(fds[2], &ws, sizeof ws) != sizeof ws)
            _exit(1);
    }
    _exit(0);
}

static void
write_file(const char *path, const char *data)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, data, strlen(data)) != (ssize_t)strlen(data))
        die(path);
    close(fd);
}

static void
one_sandbox(void)
{
    static char stack[64 * 1024];
    int go[2];
    if (!use_template && pipe2(go, O_CLOEXEC) < 0)
        die("pipe");
    if (use_host_side) { /* the host side zviz makes per sandbox: a workdir, a memory cgroup with a limit */
        snprintf(wd_path, sizeof wd_path, "/tmp/zviz-floor-wd-%d", round_no);
        snprintf(cg_path, sizeof cg_path, "/sys/fs/cgroup/memory/zviz-floor-%d", round_no);
        round_no++;
        if (mkdir(wd_path, 0700) < 0 || mkdir(cg_path, 0755) < 0)
            die("mkdir workdir/cgroup");
        char limit[160];
        snprintf(limit, sizeof limit, "%s/memory.limit_in_bytes", cg_path);
        write_file(limit, "536870912");
    }
    if (use_template) {
        int n = round_no - 1, ws;
        if (write(req_w, &n, sizeof n) != sizeof n || read(done_r, &ws, sizeof ws) != sizeof ws)
            die("template");
        if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0) {
            fprintf(stderr, "sandbox from the template failed: %#x\n", ws);
            exit(1);
        }
        goto host_side_after;
    }
    int flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP | SIGCHLD;
    if (use_net)
        flags |= CLONE_NEWNET;
    pid_t pid = clone(child, stack + sizeof stack, flags, &go[0]);
    if (pid < 0)
        die("clone");
    write_maps(pid);
    if (write(go[1], "g", 1) != 1)
        die("go");
    close(go[0]);
    close(go[1]);
    int ws;
    if (waitpid(pid, &ws, 0) != pid || !WIFEXITED(ws) || WEXITSTATUS(ws) != 0) {
        fprintf(stderr, "sandbox child failed: %#x\n", ws);
        exit(1);
    }
host_side_after:
    if (use_host_side) {
        for (int tries = 0; rmdir(cg_path) < 0; tries++) /* (EBUSY until the exit is accounted) */
            if (errno != EBUSY || tries > 1000)
                die("rmdir cgroup");
        if (rmdir(wd_path) < 0)
            die("rmdir workdir");
    }
}

static void
one_bare(void)
{
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        execve("/bin/true", true_argv, no_env);
        _exit(127);
    }
    int ws;
    waitpid(pid, &ws, 0);
}

static long long
system_ticks(void)
{
    FILE *f = fopen("/proc/stat", "r");
    long long v[10] = {0};
    if (!f || fscanf(f, "cpu %lld %lld %lld %lld %lld %lld %lld %lld", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                     &v[6], &v[7]) != 8)
        die("/proc/stat");
    fclose(f);
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]; /* not idle, not iowait */
}

static double
tree_cpu_ms(void)
{
    struct rusage s, c;
    getrusage(RUSAGE_SELF, &s);
    getrusage(RUSAGE_CHILDREN, &c);
    return (s.ru_utime.tv_sec + c.ru_utime.tv_sec + s.ru_stime.tv_sec + c.ru_stime.tv_sec) * 1e3 +
           (s.ru_utime.tv_usec + c.ru_utime.tv_usec + s.ru_stime.tv_usec + c.ru_stime.tv_usec) / 1e3;
}

static double
now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int
main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    for (int i = 2; i < argc; i++) {
        use_net |= strcmp(argv[i], "--net") == 0;
        use_host_side |= strcmp(argv[i], "--host-side") == 0;
        use_template |= strcmp(argv[i], "--template") == 0;
        use_serve |= strcmp(argv[i], "--serve") == 0;
    }
    if (use_template && use_host_side) {
        /* (the workdir would have to come from the host's mount namespace into the template's
         * sandboxes: open_tree of a mount of another namespace is EINVAL) */
        fprintf(stderr, "floor: --template does not take --host-side\n");
        return 2;
    }
    if (use_template) {
        static char stack[64 * 1024];
        static int fds[3];
        int go[2], req[2], done[2];
        if (pipe2(go, O_CLOEXEC) < 0 || pipe2(req, O_CLOEXEC) < 0 || pipe2(done, O_CLOEXEC) < 0)
            die("pipe");
        fds[0] = go[0], fds[1] = req[0], fds[2] = done[1];
        round_no = 0;
        mkdir(STAGING, 0755);
        build_filter();
        pid_t t = clone(template_main, stack + sizeof stack, CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | SIGCHLD, fds);
        if (t < 0)
            die("clone template");
        write_maps(t);
        if (write(go[1], "g", 1) != 1)
            die("go");
        req_w = req[1], done_r = done[0], template_pid = t;
        close(go[0]), close(go[1]), close(req[0]), close(done[1]);
    }
    long hz = sysconf(_SC_CLK_TCK);
    mkdir(STAGING, 0755);
    build_filter();
    for (int i = 0; i < 50; i++) { /* warm-up */
        one_bare();
        one_sandbox();
    }
    if (use_serve) {
        char b;
        while (read(0, &b, 1) == 1) {
            b == 'b' ? one_bare() : one_sandbox();
            if (write(1, &b, 1) != 1)
                break;
        }
        n = 0;
    }
    double wall[2] = {0}, tree[2] = {0}, sys[2] = {0};
    int count[2] = {0};
    for (int done = 0; done < n; done += 50) {
        for (int kind = 0; kind < 2; kind++) {
            double w0 = now_ms(), t0 = tree_cpu_ms();
            long long s0 = system_ticks();
            for (int i = 0; i < 50; i++)
                kind ? one_sandbox() : one_bare();
            usleep(20000); /* let the kernel's workers free what the block left */
            sys[kind] += (system_ticks() - s0) * 1e3 / hz; /* (the pause is idle: not counted) */
            tree[kind] += tree_cpu_ms() - t0;
            wall[kind] += now_ms() - w0 - 20.0;
            count[kind] += 50;
        }
    }
    if (use_serve)
        goto out;
    printf("per round (%d each)      wall ms  tree CPU ms  system CPU ms\n", n);
    printf("bare fork+exec          %7.3f  %11.3f  %13.3f\n", wall[0] / count[0], tree[0] / count[0],
           sys[0] / count[0]);
    printf("%-11s%-13s%7.3f  %11.3f  %13.3f\n", use_template ? "template" : use_net ? "sandbox net" : "sandbox",
           use_host_side ? " host-side" : "",
           wall[1] / count[1], tree[1] / count[1], sys[1] / count[1]);
    printf("sandbox over bare       %+7.3f  %+11.3f  %+13.3f\n", wall[1] / count[1] - wall[0] / count[0],
           tree[1] / count[1] - tree[0] / count[0], sys[1] / count[1] - sys[0] / count[0]);
out:
    if (template_pid > 0) {
        kill(template_pid, SIGKILL);
        waitpid(template_pid, NULL, 0);
    }
    return 0;
}
