/*
 * attack: one program, many escape attempts (tests/escape/). Each subcommand
 * tries one thing and prints what happened; the tests check the host side
 * (a marker file that must not appear, a listener that must not see a
 * connection, a process that must still be alive), not this program's claim.
 *
 *   attack read PATH | write PATH | symlink-read TARGET | symlink-write DIR
 *   attack hardlink SRC | rename-out DEST | handle PATH | toctou OK BAD N
 *   attack ptrace PID | vmwrite PID | kill PID | killall | procmem
 *   attack tiocsti | syscalls | x32 NAME | int80 NAME | clone-ns
 *   attack tcp IP PORT | udp IP PORT | unix PATH | abstract NAME | raw | packet
 *   attack forkbomb | memory | fds | disk DIR | spin | flood | conveyor
 *   attack zombies N SECS | daemon | sigcont N | sleepers N
 *   attack memfd MIB SECS | pipes MIB SECS | sockbuf MIB SECS  (memory outside RLIMIT_AS)
 *   attack setid | socketpair | oob | notifpipe | lease FILE SECS | dnotify
 *   attack procioctl | mknod | sched | unknown N      (test_filter_hardening.py)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/sched.h>
#include <sys/sysmacros.h>

#define SAY(...) (printf(__VA_ARGS__), putchar('\n'), fflush(stdout))

static void report(const char *what, long r)
{
    if (r < 0)
        SAY("%s: FAILED %s", what, strerror(errno));
    else
        SAY("%s: OK %ld", what, r);
}

static int do_read(const char *path)
{
    char buf[4096];
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        SAY("read %s: FAILED %s", path, strerror(errno));
        return 1;
    }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    SAY("read %s: OK [%s]", path, buf);
    return 0;
}

static int do_write(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        SAY("write %s: FAILED %s", path, strerror(errno));
        return 1;
    }
    ssize_t n = write(fd, "pwned", 5);
    SAY("write %s: OK %zd", path, n);
    close(fd);
    return 0;
}

/* TOCTOU: a thread flips a shared path buffer between an allowed and a
 * forbidden path while the main thread opens it again and again. */
static char flip_buf[4096];
static const char *flip_a, *flip_b;
static volatile int flip_stop;
static void *flipper(void *arg)
{
    (void)arg;
    while (!flip_stop) {
        strcpy(flip_buf, flip_a);
        strcpy(flip_buf, flip_b);
    }
    return NULL;
}

static int do_toctou(const char *ok, const char *bad, int n)
{
    pthread_t t;
    flip_a = ok;
    flip_b = bad;
    strcpy(flip_buf, ok);
    pthread_create(&t, NULL, flipper, NULL);
    int leaked = 0, opened = 0;
    char buf[256];
    for (int i = 0; i < n; i++) {
        int fd = open(flip_buf, O_RDONLY);
        if (fd < 0)
            continue;
        opened++;
        ssize_t r = read(fd, buf, sizeof buf - 1);
        buf[r > 0 ? r : 0] = 0;
        if (strstr(buf, "SECRET"))
            leaked++;
        close(fd);
    }
    flip_stop = 1;
    pthread_join(t, NULL);
    SAY("toctou: tries %d opened %d leaked %d", n, opened, leaked);
    return 0;
}

static long x32(long nr, long a, long b, long c)
{
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(nr | 0x40000000L), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}

static long int80(long nr, long a, long b, long c)
{
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return ret;
}

static int do_syscalls(void)
{
    union bpf_attr battr;
    struct perf_event_attr pattr;
    memset(&battr, 0, sizeof battr);
    memset(&pattr, 0, sizeof pattr);
    pattr.size = sizeof pattr;
    pattr.type = PERF_TYPE_SOFTWARE;
    pattr.config = PERF_COUNT_SW_CPU_CLOCK;
    char params[120];
    memset(params, 0, sizeof params);

    report("mount", mount("none", "/tmp", "tmpfs", 0, NULL));
    report("unshare-user", unshare(CLONE_NEWUSER));
    report("unshare-mount", unshare(CLONE_NEWNS));
    int nsfd = open("/proc/1/ns/mnt", O_RDONLY);
    report("setns", nsfd < 0 ? -1 : setns(nsfd, 0));
    report("chroot", chroot("/tmp"));
    report("pivot_root", syscall(SYS_pivot_root, "/tmp", "/tmp"));
    report("bpf", syscall(SYS_bpf, BPF_PROG_LOAD, &battr, sizeof battr));
    report("io_uring_setup", syscall(SYS_io_uring_setup, 8, params));
    report("perf_event_open", syscall(SYS_perf_event_open, &pattr, 0, -1, -1, 0));
    report("keyctl", syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 0));
    report("add_key", syscall(SYS_add_key, "user", "zviz", "x", 1, -3));
    report("userfaultfd", syscall(SYS_userfaultfd, 0));
    report("init_module", syscall(SYS_init_module, NULL, 0, ""));
    report("finit_module", syscall(SYS_finit_module, 0, "", 0));
    report("delete_module", syscall(SYS_delete_module, "ext4", 0));
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    report("reboot", syscall(SYS_reboot, 0xfee1dead, 672274793, 0x4321fedc, NULL));
    report("syslog", syscall(SYS_syslog, 3, params, sizeof params));
    report("personality", personality(READ_IMPLIES_EXEC));
    report("swapon", syscall(SYS_swapon, "/tmp/x", 0));
    report("acct", syscall(SYS_acct, "/tmp/x"));
    report("open_by_handle_at", syscall(SYS_open_by_handle_at, AT_FDCWD, params, O_RDONLY));
    report("name_to_handle_at", syscall(SYS_name_to_handle_at, AT_FDCWD, "/etc", params, params, 0));
    report("settimeofday", syscall(SYS_settimeofday, NULL, NULL));
    report("sethostname", sethostname("pwned", 5));
    report("setuid0", syscall(SYS_setuid, 0));
    report("ptrace-traceme", syscall(SYS_ptrace, 0, 0, 0, 0));
    report("process_vm_readv", syscall(SYS_process_vm_readv, 1, NULL, 0, NULL, 0, 0));
    report("pidfd_getfd", syscall(SYS_pidfd_getfd, 0, 0, 0));
    report("fsopen", syscall(SYS_fsopen, "tmpfs", 0));
    report("open_tree", syscall(SYS_open_tree, AT_FDCWD, "/", 1));
    report("landlock_restrict_self", syscall(SYS_landlock_restrict_self, -1, 0));
    return 0;
}

static int do_clone_ns(void)
{
    struct clone_args ca;
    memset(&ca, 0, sizeof ca);
    ca.flags = CLONE_NEWUSER | CLONE_NEWNS;
    ca.exit_signal = SIGCHLD;
    long r = syscall(SYS_clone3, &ca, sizeof ca);
    if (r == 0)
        _exit(0);
    report("clone3-newuser", r);
    r = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
    if (r == 0)
        _exit(0);
    report("clone-newuser", r);
    r = syscall(SYS_clone, CLONE_NEWPID | SIGCHLD, 0, 0, 0, 0);
    if (r == 0)
        _exit(0);
    report("clone-newpid", r);
    return 0;
}

static int do_net(const char *kind, const char *a, const char *b)
{
    int s;
    if (!strcmp(kind, "tcp") || !strcmp(kind, "udp")) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(b))};
        inet_pton(AF_INET, a, &sa.sin_addr);
        s = socket(AF_INET, !strcmp(kind, "tcp") ? SOCK_STREAM : SOCK_DGRAM, 0);
        if (s < 0) {
            SAY("%s socket: FAILED %s", kind, strerror(errno));
            return 0;
        }
        if (!strcmp(kind, "udp")) {
            report("udp sendto", sendto(s, "pwned", 5, 0, (struct sockaddr *)&sa, sizeof sa));
            return 0;
        }
        report("tcp connect", connect(s, (struct sockaddr *)&sa, sizeof sa));
        /* TCP Fast Open: a connect inside sendto */
        int s2 = socket(AF_INET, SOCK_STREAM, 0);
        report("tcp fastopen", sendto(s2, "pwned", 5, MSG_FASTOPEN, (struct sockaddr *)&sa, sizeof sa));
        return 0;
    }
    if (!strcmp(kind, "unix") || !strcmp(kind, "abstract")) {
        struct sockaddr_un su = {.sun_family = AF_UNIX};
        socklen_t len;
        if (!strcmp(kind, "abstract")) {
            su.sun_path[0] = 0;
            strncpy(su.sun_path + 1, a, sizeof su.sun_path - 2);
            len = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(a);
        } else {
            strncpy(su.sun_path, a, sizeof su.sun_path - 1);
            len = sizeof su;
        }
        s = socket(AF_UNIX, SOCK_STREAM, 0);
        report(kind, connect(s, (struct sockaddr *)&su, len));
        return 0;
    }
    if (!strcmp(kind, "raw")) {
        report("raw socket", socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
        report("raw socket6", socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6));
        return 0;
    }
    if (!strcmp(kind, "packet")) {
        report("packet socket", socket(AF_PACKET, SOCK_RAW, htons(3)));
        /* NETLINK_ROUTE opens in a network namespace of the sandbox's own
           (tests/escape/test_netlink.py); sock_diag never does */
        report("netlink sock_diag socket", socket(AF_NETLINK, SOCK_RAW, 4 /* NETLINK_SOCK_DIAG */));
        return 0;
    }
    return 2;
}

/* Hold memory that no process's address space shows: memfd pages, pipe
 * buffers, unix socket buffers. Prints what it holds as it goes (the last
 * line before a kill says how far it got), then holds it for SECS. */
static void held(const char *what, size_t bytes, int final)
{
    printf("%s held %zu MiB%s\n", what, bytes >> 20, final ? " total" : "");
    fflush(stdout);
}

static int do_memfd(size_t mib, int secs)
{
    static char buf[1 << 20];
    memset(buf, 'x', sizeof buf);
    size_t total = 0;
    int fd = -1;
    for (size_t i = 0; i < mib; i++) {
        if (i % 64 == 0) { /* a new memfd every 64 MiB: RLIMIT_FSIZE caps each file, not their sum */
            fd = syscall(SYS_memfd_create, "hold", 0);
            if (fd < 0) {
                printf("memfd_create: FAILED errno=%d\n", errno);
                return 1;
            }
        }
        if (write(fd, buf, sizeof buf) != (ssize_t)sizeof buf) {
            printf("memfd write: FAILED errno=%d\n", errno);
            break;
        }
        total += sizeof buf;
        if (i % 16 == 15)
            held("memfd", total, 0);
    }
    held("memfd", total, 1);
    sleep(secs);
    return 0;
}

static int do_pipes(size_t mib, int secs)
{
    static char buf[65536];
    memset(buf, 'y', sizeof buf);
    size_t total = 0, last = 0;
    for (int i = 0; i < 4000 && total < (mib << 20); i++) {
        int p[2];
        if (pipe2(p, O_NONBLOCK) < 0)
            break;
        fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
        ssize_t w;
        while ((w = write(p[1], buf, sizeof buf)) > 0)
            total += w;
        if (total - last >= (16 << 20)) {
            held("pipes", total, 0);
            last = total;
        }
    }
    held("pipes", total, 1);
    sleep(secs);
    return 0;
}

static int do_sockbuf(size_t mib, int secs)
{
    static char buf[65536];
    memset(buf, 'z', sizeof buf);
    size_t total = 0, last = 0;
    for (int i = 0; i < 4000 && total < (mib << 20); i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) < 0)
            break;
        int big = 4 << 20;
        setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
        ssize_t w;
        while ((w = send(sv[0], buf, sizeof buf, MSG_DONTWAIT)) > 0)
            total += w;
        if (total - last >= (16 << 20)) {
            held("sockbuf", total, 0);
            last = total;
        }
    }
    held("sockbuf", total, 1);
    sleep(secs);
    return 0;
}

/* ---- hardening of the reachable surface (test_filter_hardening.py).
 * Every call goes through syscall(2), so each argument is the full 64-bit
 * register we choose: G puts garbage in the high half, which the kernel
 * drops for int/umode_t arguments. */
#define G 0xDEADBEEF00000000L
#define RS(...) syscall(__VA_ARGS__)

static void *idle_thread(void *arg)
{
    (void)arg;
    for (;;)
        sleep(1);  /* pause() is not in the python preset */
    return NULL;
}

static int do_hardening(const char *cmd, const char *a, const char *b)
{
    if (!strcmp(cmd, "setid")) {
        /* each file ends up with no set-id bit if every call is refused */
        const char *names[] = {"chmod", "chmod-g", "fchmod", "fchmodat", "fchmodat2", "chmod-sgid"};
        for (unsigned i = 0; i < sizeof names / sizeof *names; i++)
            close(open(names[i], O_WRONLY | O_CREAT, 0755));
        report("chmod 06755", RS(SYS_chmod, "chmod", 06755L));
        report("chmod G|06755", RS(SYS_chmod, "chmod-g", G | 06755L));
        int fd = open("fchmod", O_RDONLY);
        report("fchmod 04755", RS(SYS_fchmod, fd, 04755L));
        report("fchmodat 06755", RS(SYS_fchmodat, AT_FDCWD, "fchmodat", 06755L));
        report("fchmodat2 04755", RS(452, AT_FDCWD, "fchmodat2", 04755L, 0L));
        report("chmod 02755", RS(SYS_chmod, "chmod-sgid", 02755L));
        report("open O_CREAT 06755", RS(SYS_open, "open", (long)(O_WRONLY | O_CREAT), 06755L));
        report("openat O_CREAT G|04755", RS(SYS_openat, AT_FDCWD, "openat", G | O_WRONLY | O_CREAT, G | 04755L));
        report("creat 04755", RS(SYS_creat, "creat", 04755L));
        report("mknod S_IFREG|06755", RS(SYS_mknod, "mknod", (long)(S_IFREG | 06755), 0L));
        report("mknodat S_IFREG|04755", RS(SYS_mknodat, AT_FDCWD, "mknodat", G | S_IFREG | 04755L, 0L));
        int t = RS(SYS_open, ".", (long)(O_TMPFILE | O_WRONLY), 04755L);
        report("open O_TMPFILE 04755", t);
        if (t >= 0) {
            char p[64];
            snprintf(p, sizeof p, "/proc/self/fd/%d", t);
            report("linkat tmpfile", linkat(AT_FDCWD, p, AT_FDCWD, "tmpfile", AT_SYMLINK_FOLLOW));
        }
        report("mkdir 06755", mkdir("dir", 06755));
        report("chmod 0755 (allowed)", RS(SYS_chmod, "chmod", 0755L));
        report("open O_CREAT 0644 (allowed)", RS(SYS_open, "plain", (long)(O_WRONLY | O_CREAT), 0644L));
        return 0;
    }
    if (!strcmp(cmd, "socketpair")) {
        long fams[] = {AF_INET, AF_INET6, AF_NETLINK, 40 /* VSOCK */, 30 /* TIPC */, 17 /* PACKET */,
                       38 /* ALG */, 44 /* XDP */, G | AF_INET, (1L << 32) | AF_NETLINK};
        for (unsigned i = 0; i < sizeof fams / sizeof *fams; i++)
            for (long type = 1; type <= 2; type++) {
                int sv[2];
                char what[64];
                snprintf(what, sizeof what, "socketpair %#lx/%ld", fams[i], type);
                report(what, RS(SYS_socketpair, fams[i], type, 0L, sv));
            }
        int sv[2];
        report("socketpair AF_UNIX (allowed)", RS(SYS_socketpair, (long)AF_UNIX, (long)SOCK_STREAM, 0L, sv));
        return 0;
    }
    if (!strcmp(cmd, "oob")) {
        int sv[2];
        char c = 'x';
        struct iovec iov = {&c, 1};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
        struct mmsghdr mm = {.msg_hdr = mh};
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
            return 1;
        report("send ordinary (allowed)", RS(SYS_sendto, sv[0], &c, 1L, 0L, 0L, 0L));
        report("recv ordinary (allowed)", RS(SYS_recvfrom, sv[1], &c, 1L, (long)MSG_DONTWAIT, 0L, 0L));
        report("sendto MSG_OOB", RS(SYS_sendto, sv[0], &c, 1L, (long)MSG_OOB, 0L, 0L));
        report("sendto G|MSG_OOB", RS(SYS_sendto, sv[0], &c, 1L, G | MSG_OOB, 0L, 0L));
        report("sendmsg MSG_OOB", RS(SYS_sendmsg, sv[0], &mh, (long)MSG_OOB));
        report("sendmmsg MSG_OOB", RS(SYS_sendmmsg, sv[0], &mm, 1L, (long)MSG_OOB));
        report("recvfrom MSG_OOB", RS(SYS_recvfrom, sv[1], &c, 1L, (long)(MSG_OOB | MSG_DONTWAIT), 0L, 0L));
        report("recvfrom MSG_OOB|MSG_PEEK", RS(SYS_recvfrom, sv[1], &c, 1L, (long)(MSG_OOB | MSG_PEEK), 0L, 0L));
        report("recvmsg MSG_OOB", RS(SYS_recvmsg, sv[1], &mh, G | MSG_OOB | MSG_DONTWAIT));
        report("recvmmsg MSG_OOB", RS(SYS_recvmmsg, sv[1], &mm, 1L, (long)(MSG_OOB | MSG_DONTWAIT), 0L));
        return 0;
    }
    if (!strcmp(cmd, "notifpipe")) {
        int p[2];
        report("pipe2 O_NOTIFICATION_PIPE", RS(SYS_pipe2, p, 0200L));
        report("pipe2 G|O_NOTIFICATION_PIPE", RS(SYS_pipe2, p, G | 0200L | O_CLOEXEC));
        report("pipe2 O_CLOEXEC (allowed)", RS(SYS_pipe2, p, (long)O_CLOEXEC));
        return 0;
    }
    if (!strcmp(cmd, "lease")) {
        /* a write lease on a workdir file: the host's open would break it */
        int fd = open(a, O_RDWR);
        report("F_SETLEASE G|F_WRLCK", RS(SYS_fcntl, fd, G | F_SETLEASE, (long)F_WRLCK));
        report("F_SETLEASE F_WRLCK", RS(SYS_fcntl, fd, (long)F_SETLEASE, (long)F_WRLCK));
        report("F_SETLEASE F_RDLCK", RS(SYS_fcntl, fd, (long)F_SETLEASE, (long)F_RDLCK));
        report("F_GETLEASE (allowed)", RS(SYS_fcntl, fd, (long)F_GETLEASE, 0L));
        SAY("holding");
        sleep(atoi(b));
        return 0;
    }
    if (!strcmp(cmd, "dnotify")) {
        int fd = open(".", O_RDONLY | O_DIRECTORY);
        report("F_NOTIFY", RS(SYS_fcntl, fd, (long)F_NOTIFY, (long)(DN_CREATE | DN_MULTISHOT)));
        report("F_NOTIFY 1<<32", RS(SYS_fcntl, fd, (1L << 32) | F_NOTIFY, (long)DN_CREATE));
        report("F_SETSIG (allowed)", RS(SYS_fcntl, fd, (long)F_SETSIG, 0L));
        report("F_GETFD (allowed)", RS(SYS_fcntl, fd, (long)F_GETFD, 0L));
        return 0;
    }
    if (!strcmp(cmd, "procioctl")) {
        unsigned long long arg[16] = {96}, q[13] = {104};
        q[2] = (unsigned long)&do_hardening;
        int pm = open("/proc/self/pagemap", O_RDONLY), maps = open("/proc/self/maps", O_RDONLY);
        SAY("opened: %d %d", pm, maps);
        report("PAGEMAP_SCAN", RS(SYS_ioctl, pm, 0xC0606610L, arg));
        report("PAGEMAP_SCAN sign-extended", RS(SYS_ioctl, pm, (long)(int)0xC0606610, arg));
        report("PAGEMAP_SCAN G", RS(SYS_ioctl, pm, G | 0xC0606610L, arg));
        report("PROCMAP_QUERY", RS(SYS_ioctl, maps, 0xC0686611L, q));
        report("PROCMAP_QUERY G", RS(SYS_ioctl, maps, G | 0xC0686611L, q));
        report("FIONREAD on a pipe (allowed)", ({ int p[2], n; pipe(p); RS(SYS_ioctl, p[0], (long)FIONREAD, &n); }));
        return 0;
    }
    if (!strcmp(cmd, "mknod")) {
        report("mknod FIFO (allowed)", mknod("fifo", S_IFIFO | 0644, 0));
        report("mknod S_IFREG (allowed)", mknod("reg", S_IFREG | 0644, 0));
        report("mknod S_IFSOCK", mknod("sock", S_IFSOCK | 0644, 0));
        report("mknodat S_IFSOCK G", RS(SYS_mknodat, AT_FDCWD, "sock2", G | S_IFSOCK | 0644, 0L));
        report("mknod S_IFCHR 1:3", mknod("null", S_IFCHR | 0666, makedev(1, 3)));
        report("mknod S_IFIFO|S_ISUID", mknod("fifo2", S_IFIFO | S_ISUID | 0644, 0));
        return 0;
    }
    if (!strcmp(cmd, "sched")) {
        /* what libzmq does on its own threads, then what would harm pid 1
         * (only inside a sandbox: pid 1 must be zviz-init, comm _zviz_init) */
        char comm[32] = "";
        int cf = open("/proc/1/comm", O_RDONLY);
        if (cf < 0 || read(cf, comm, sizeof comm - 1) < 0 || strncmp(comm, "_zviz_init", 10)) {
            SAY("sched: pid 1 is not zviz-init [%s]: refusing to run", comm);
            return 3;
        }
        pthread_t t;
        struct sched_param sp = {0};
        pthread_create(&t, NULL, idle_thread, NULL);
        errno = pthread_setschedparam(t, SCHED_OTHER, &sp);
        report("pthread_setschedparam thread SCHED_OTHER (allowed)", errno ? -1 : 0);
        errno = pthread_setschedparam(t, SCHED_BATCH, &sp);
        report("pthread_setschedparam thread SCHED_BATCH (allowed)", errno ? -1 : 0);
        errno = pthread_setschedparam(t, SCHED_IDLE, &sp);
        report("pthread_setschedparam thread SCHED_IDLE (allowed)", errno ? -1 : 0);
        report("sched_setscheduler self SCHED_OTHER (allowed)", RS(SYS_sched_setscheduler, 0L, 0L, &sp));
        sp.sched_priority = 1;
        errno = pthread_setschedparam(t, SCHED_FIFO, &sp);
        report("pthread_setschedparam thread SCHED_FIFO", errno ? -1 : 0);
        report("sched_setscheduler self SCHED_RR", RS(SYS_sched_setscheduler, 0L, (long)SCHED_RR, &sp));
        sp.sched_priority = 0;
        report("sched_setscheduler 1 SCHED_IDLE", RS(SYS_sched_setscheduler, 1L, (long)SCHED_IDLE, &sp));
        report("sched_setscheduler 1 SCHED_BATCH", RS(SYS_sched_setscheduler, 1L, (long)SCHED_BATCH, &sp));
        report("sched_setscheduler 1<<32|1 SCHED_IDLE", RS(SYS_sched_setscheduler, (1L << 32) | 1, (long)SCHED_IDLE, &sp));
        report("sched_setscheduler G|1 SCHED_IDLE", RS(SYS_sched_setscheduler, G | 1, (long)SCHED_IDLE, &sp));
        report("sched_setscheduler 1 G|SCHED_IDLE", RS(SYS_sched_setscheduler, 1L, G | SCHED_IDLE, &sp));
        report("sched_setparam 1", RS(SYS_sched_setparam, 1L, &sp));
        report("sched_getscheduler 1", RS(SYS_sched_getscheduler, 1L));
        return 0;
    }
    if (!strcmp(cmd, "unknown")) {
        /* distinct numbers outside the x86_64 table (x32's bit stays clear) */
        long n = atol(a), refused = 0;
        for (long i = 0; i < n; i++)
            if (RS(1000 + i * 7919 % 0x3FF00000L, 0L, 0L, 0L) < 0)
                refused++;
        SAY("unknown: %ld calls, %ld refused", n, refused);
        return 0;
    }
    return -1;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    const char *cmd = argv[1];
    const char *a = argc > 2 ? argv[2] : "";
    const char *b = argc > 3 ? argv[3] : "";
    int hardening = do_hardening(cmd, a, b);
    if (hardening >= 0)
        return hardening;

    if (!strcmp(cmd, "read"))
        return do_read(a);
    if (!strcmp(cmd, "memfd"))
        return do_memfd(strtoul(a, NULL, 10), atoi(b));
    if (!strcmp(cmd, "pipes"))
        return do_pipes(strtoul(a, NULL, 10), atoi(b));
    if (!strcmp(cmd, "sockbuf"))
        return do_sockbuf(strtoul(a, NULL, 10), atoi(b));
    if (!strcmp(cmd, "write"))
        return do_write(a);
    if (!strcmp(cmd, "symlink-read")) {
        report("symlink", symlink(a, "lnk"));
        return do_read("lnk");
    }
    if (!strcmp(cmd, "symlink-write")) {
        report("symlink", symlink(a, "dlnk"));
        return do_write("dlnk/pwned");
    }
    if (!strcmp(cmd, "hardlink")) {
        report("link", link(a, "hl"));
        return do_read("hl");
    }
    if (!strcmp(cmd, "rename-out")) {
        do_write("mine");
        report("rename", rename("mine", a));
        return 0;
    }
    if (!strcmp(cmd, "handle")) {
        struct {
            unsigned int handle_bytes;
            int handle_type;
            unsigned char f_handle[128];
        } h = {128, 0, {0}};
        int mount_id;
        long r = syscall(SYS_name_to_handle_at, AT_FDCWD, a, &h, &mount_id, 0);
        report("name_to_handle_at", r);
        long fd = syscall(SYS_open_by_handle_at, AT_FDCWD, &h, O_RDONLY);
        report("open_by_handle_at", fd);
        return 0;
    }
    if (!strcmp(cmd, "toctou"))
        return do_toctou(a, b, argc > 4 ? atoi(argv[4]) : 10000);
    if (!strcmp(cmd, "ptrace")) {
        report("ptrace-attach", syscall(SYS_ptrace, 16 /* ATTACH */, atoi(a), 0, 0));
        report("ptrace-seize", syscall(SYS_ptrace, 0x4206 /* SEIZE */, atoi(a), 0, 0));
        return 0;
    }
    if (!strcmp(cmd, "vmwrite")) {
        char data[8] = "pwned";
        struct iovec local = {data, 5}, remote = {(void *)0x400000, 5};
        report("process_vm_writev", syscall(SYS_process_vm_writev, atoi(a), &local, 1, &remote, 1, 0));
        return 0;
    }
    if (!strcmp(cmd, "kill")) {
        report("kill", kill(atoi(a), SIGKILL));
        return 0;
    }
    if (!strcmp(cmd, "killall")) {
        report("kill(-1)", kill(-1, SIGKILL));
        return 0;
    }
    if (!strcmp(cmd, "procmem")) {
        report("open /proc/self/mem rw", open("/proc/self/mem", O_RDWR));
        report("open /proc/1/mem rw", open("/proc/1/mem", O_RDWR));
        return 0;
    }
    if (!strcmp(cmd, "tiocsti")) {
        char c = 'x';
        for (int fd = 0; fd < 3; fd++) {
            char what[32];
            snprintf(what, sizeof what, "TIOCSTI fd %d", fd);
            report(what, ioctl(fd, TIOCSTI, &c));
        }
        report("open /dev/tty", open("/dev/tty", O_RDWR));
        return 0;
    }
    if (!strcmp(cmd, "ids")) {
        char line[256], caps[64] = "?";
        FILE *f = fopen("/proc/self/status", "r");
        while (f && fgets(line, sizeof line, f))
            if (!strncmp(line, "CapEff:", 7))
                sscanf(line + 7, "%63s", caps);
        SAY("ids: ruid %d euid %d caps %s", getuid(), geteuid(), caps);
        report("write /etc/zviz-pwned", open("/etc/zviz-pwned", O_WRONLY | O_CREAT, 0644));
        return 0;
    }
    if (!strcmp(cmd, "syscalls"))
        return do_syscalls();
    if (!strcmp(cmd, "clone-ns"))
        return do_clone_ns();
    if (!strcmp(cmd, "x32") || !strcmp(cmd, "int80")) {
        /* NAME (getpid, mount) or a raw number in that ABI's table. The
         * process must die by SIGSYS at the call, so nothing after it prints. */
        long nr, r;
        int x32abi = !strcmp(cmd, "x32");
        if (!strcmp(a, "mount"))
            nr = x32abi ? 165 : 21;
        else if (!strcmp(a, "getpid"))
            nr = x32abi ? 39 : 20;
        else
            nr = atol(a);
        r = x32abi ? x32(nr, (long)"none", (long)"/tmp", (long)"tmpfs") : int80(nr, (long)"none", (long)"/tmp", (long)"tmpfs");
        SAY("%s %s: RETURNED %ld", cmd, a, r);
        return 0;
    }
    if (!strcmp(cmd, "tcp") || !strcmp(cmd, "udp") || !strcmp(cmd, "unix") || !strcmp(cmd, "abstract") ||
        !strcmp(cmd, "raw") || !strcmp(cmd, "packet"))
        return do_net(cmd, a, b);
    if (!strcmp(cmd, "forkbomb")) {
        int n = 0;
        for (;;) {
            pid_t p = fork();
            if (p < 0)
                break;
            if (p == 0) {
                pause();
                _exit(0);
            }
            n++;
        }
        SAY("forkbomb: stopped after %d: %s", n, strerror(errno));
        return 0;
    }
    if (!strcmp(cmd, "memory")) {
        size_t total = 0;
        for (;;) {
            char *p = mmap(NULL, 64 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED)
                break;
            memset(p, 1, 64 << 20);
            total += 64 << 20;
        }
        SAY("memory: stopped at %zu MiB: %s", total >> 20, strerror(errno));
        return 0;
    }
    if (!strcmp(cmd, "fds")) {
        int n = 0;
        while (open("/dev/null", O_RDONLY) >= 0)
            n++;
        SAY("fds: stopped after %d: %s", n, strerror(errno));
        return 0;
    }
    if (!strcmp(cmd, "disk")) {
        /* one huge file, then many files */
        char path[4096];
        snprintf(path, sizeof path, "%s/big", a);
        int fd = open(path, O_WRONLY | O_CREAT, 0644);
        static char chunk[1 << 20];
        memset(chunk, 'x', sizeof chunk);
        long long written = 0;
        signal(SIGXFSZ, SIG_IGN);
        while (fd >= 0 && write(fd, chunk, sizeof chunk) > 0)
            written += sizeof chunk;
        SAY("disk: one file stopped at %lld MiB: %s", written >> 20, strerror(errno));
        return 0;
    }
    if (!strcmp(cmd, "spin")) {
        for (volatile unsigned long i = 0;; i++)
            ;
    }
    if (!strcmp(cmd, "flood")) {
        static char chunk[65536];
        memset(chunk, 'y', sizeof chunk);
        for (;;)
            if (write(1, chunk, sizeof chunk) < 0)
                return 0;
    }
    if (!strcmp(cmd, "conveyor")) {
        /* Outlive the command: a chain of processes whose inner nodes spin
         * and whose leaf forks again whenever the process limit frees a slot.
         * A cleaner that kills only its direct children cuts the chain at the
         * top one level at a time while it regrows at the bottom. The leaf
         * rewrites ./alive now and then: the test watches it. */
        if (fork() > 0) {
            usleep(300000);
            SAY("conveyor: main exits");
            return 0;
        }
        for (int i = 0; i < 3; i++)
            close(i);
        for (long n = 1;; n++) {
            pid_t p = fork();
            if (p == 0)
                continue; /* the new leaf */
            if (p > 0)
                for (volatile unsigned long i = 0;; i++)
                    ; /* an inner node */
            if (n % 500 == 0) {
                int fd = open("alive", O_WRONLY | O_CREAT | O_TRUNC, 0644);
                if (fd >= 0) {
                    dprintf(fd, "%ld\n", n);
                    close(fd);
                }
            }
            sched_yield();
        }
    }
    if (!strcmp(cmd, "zombies") && argc > 3) {
        /* Hold N pids as zombies (never reaped) for SECS seconds, then say
         * so in ./zready first. */
        int n = atoi(argv[2]), made = 0;
        for (int i = 0; i < n; i++) {
            pid_t c = vfork();
            if (c == 0)
                _exit(0);
            if (c > 0)
                made++;
        }
        close(open("zready", O_WRONLY | O_CREAT, 0644));
        SAY("zombies: %d", made);
        sleep(atoi(argv[3]));
        return 0;
    }
    if (!strcmp(cmd, "daemon")) {
        /* A child that outlives us, stdio closed, rewriting ./alive. */
        if (fork() == 0) {
            for (int i = 0; i < 3; i++)
                close(i);
            for (long n = 1;; n++) {
                int fd = open("alive", O_WRONLY | O_CREAT | O_TRUNC, 0644);
                if (fd >= 0) {
                    dprintf(fd, "%ld\n", n);
                    close(fd);
                }
                usleep(100000);
            }
        }
        SAY("daemon: main exits");
        return 0;
    }
    if (!strcmp(cmd, "sigcont") && argc > 2) {
        /* N busy children that keep resuming every process they can reach:
         * a freeze that waits for everything to be stopped never ends. */
        int n = atoi(argv[2]);
        for (int i = 0; i < n; i++)
            if (fork() == 0)
                for (;;) {
                    kill(-1, SIGCONT);
                    for (volatile int k = 0; k < 20000; k++)
                        ;
                }
        SAY("sigcont: %d", n);
        for (;;)
            pause();
    }
    if (!strcmp(cmd, "sleepers") && argc > 2) {
        int n = atoi(argv[2]);
        for (int i = 0; i < n; i++)
            if (fork() == 0)
                for (;;)
                    pause();
        SAY("sleepers: %d", n);
        for (;;)
            pause();
    }
    SAY("unknown attack %s", cmd);
    return 2;
}
