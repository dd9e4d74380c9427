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
 */
#include <asm/unistd.h>
#include <linux/resource.h>
#include <linux/sched.h>
#include <linux/signal.h>
#include <linux/wait.h>

typedef unsigned long size_t;

#include "_rsys.h"
#define sys6 rsys_x86_64
#define S1(n, a) sys6(n, (long)(a), 0, 0, 0, 0, 0)
#define S3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define S4(n, a, b, c, d) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

#define ZVIZ_STATUS_MAGIC 0x7a76697aU /* "zviz" */

struct status_record {
    unsigned int magic;
    int wstatus;
    struct rusage ru; /* of the main child and everything it reaped */
};

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

__attribute__((used)) static void
init_main(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    char **envp = argv + argc + 1;

    if (argc < 4) {
        put("zviz-init: usage: zviz-init STATUS_FD EXE ARG0 [ARGS...]\n");
        die(125);
    }
    int status_fd = parse_fd(argv[1]);
    const char *exe = argv[2];

    long pid = S4(__NR_clone, SIGCHLD, 0, 0, 0);
    if (pid < 0) {
        put("zviz-init: clone failed\n");
        die(125);
    }
    if (pid == 0) {
        if (status_fd >= 0)
            S1(__NR_close, status_fd);
        long r = S3(__NR_execve, exe, argv + 3, envp);
        char num[24];
        utoa((unsigned long)-r, num);
        put("zviz: cannot execute ");
        put(exe);
        put(": errno ");
        put(num);
        put(r == -2 ? " (not found)\n" : (r == -13 ? " (permission denied: outside the policy's paths?)\n" : "\n"));
        die(r == -2 ? 127 : 126);
    }

    /* Reap everything; remember the main child's status and usage. */
    struct status_record rec;
    for (unsigned i = 0; i < sizeof rec; i++)
        ((char *)&rec)[i] = 0;
    rec.magic = ZVIZ_STATUS_MAGIC;
    for (;;) {
        int ws = 0;
        struct rusage ru;
        long w = S4(__NR_wait4, -1, &ws, __WALL, &ru);
        if (w == -4) /* EINTR */
            continue;
        if (w < 0)
            die(125); /* ECHILD before the main child: cannot happen */
        if (w == pid) {
            rec.wstatus = ws;
            rec.ru = ru;
            break;
        }
    }
    if (status_fd >= 0)
        S3(__NR_write, status_fd, &rec, sizeof rec);
    /* Mirror the main child's status as far as an exit code can. */
    if ((rec.wstatus & 0x7f) == 0)
        die((rec.wstatus >> 8) & 0xff);
    die(128 + (rec.wstatus & 0x7f));
}

__asm__(".text\n"
        ".global _start\n"
        "_start:\n"
        "  xor %rbp, %rbp\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call init_main\n"
        "  hlt\n");
