/* Network and supervisor attacks (tests/escape/test_net_supervisor.py).
 * One subcommand per attack; every line printed is "what: OK detail" or
 * "what: FAILED reason", so the host side can assert on it. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/ethtool.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void ok(const char *what, const char *detail) { printf("%s: OK %s\n", what, detail); fflush(stdout); }
static void failed(const char *what) { printf("%s: FAILED %s\n", what, strerror(errno)); fflush(stdout); }

/* listen() without bind(): the kernel autobinds an ephemeral port. Print the
 * first port, hold n listeners, accept one connection for `secs` seconds. */
static int listen_autobind(int n, int secs)
{
    int first = -1;
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) { failed("socket"); return 1; }
        if (listen(s, 16) < 0) { failed("listen"); return 1; }
        if (first < 0) first = s;
    }
    struct sockaddr_in a; socklen_t len = sizeof a;
    getsockname(first, (struct sockaddr *)&a, &len);
    printf("listen: OK port %d count %d\n", ntohs(a.sin_port), n);
    fflush(stdout);
    struct pollfd p = {first, POLLIN, 0};
    if (poll(&p, 1, secs * 1000) > 0) {
        int c = accept(first, 0, 0);
        if (c >= 0) { write(c, "PWNED", 5); ok("accept", "a connection came in"); return 0; }
    }
    printf("accept: FAILED nothing came\n");
    return 0;
}

/* A segment-routing header (type 4) whose first segment is `via`: the SYN of
 * a socket carrying it goes to `via`, the listed address only later. */
static int rthdr_connect(const char *via, const char *dst, int port, int after)
{
    int s = socket(AF_INET6, SOCK_STREAM, 0);
    if (s < 0) { failed("socket"); return 1; }
    unsigned char h[8 + 32] = {0};
    h[0] = 0; h[1] = 4; h[2] = 4; h[3] = 1; h[4] = 1; h[5] = 1;
    inet_pton(AF_INET6, dst, h + 8);   /* segments[0]: the last one */
    inet_pton(AF_INET6, via, h + 24);  /* segments[1]: the first hop */
    if (!after) {
        if (setsockopt(s, IPPROTO_IPV6, IPV6_RTHDR, h, sizeof h) < 0) failed("rthdr before");
        else ok("rthdr before", "set");
    }
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    inet_pton(AF_INET6, dst, &a.sin6_addr);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) failed("connect");
    else ok("connect", "0");
    if (after) {
        if (setsockopt(s, IPPROTO_IPV6, IPV6_RTHDR, h, sizeof h) < 0) failed("rthdr after");
        else ok("rthdr after", "set");
        /* the same through the upper 32 bits of the optname register */
        if (syscall(SYS_setsockopt, s, IPPROTO_IPV6, 0x100000000L | IPV6_RTHDR, h, sizeof h) < 0)
            failed("rthdr high bits");
        else ok("rthdr high bits", "set");
        unsigned char opt[8] = {0x83, 7, 4, 127, 0, 0, 2, 0}; /* IP_OPTIONS: LSRR via 127.0.0.2 */
        if (setsockopt(s, IPPROTO_IP, IP_OPTIONS, opt, sizeof opt) < 0) failed("ip options");
        else ok("ip options", "set");
        int one = 1;
        if (setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) failed("nodelay");
        else ok("nodelay", "set");
    }
    if (write(s, "hello", 5) != 5) failed("write");
    else ok("write", "5");
    return 0;
}

/* a blocking connect from a thread that is not the thread-group leader */
static struct sockaddr_in thread_target;
static void *thread_connect(void *arg)
{
    (void)arg;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&thread_target, sizeof thread_target) < 0) failed("thread connect");
    else { ok("thread connect", "0"); write(s, "th", 2); }
    return 0;
}

/* What a program sees of a supervised connect: non-blocking, close-on-exec,
 * names, options. */
static int connect_semantics(const char *host, int port)
{
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    int r = connect(s, (struct sockaddr *)&a, sizeof a);
    printf("nonblocking connect: %s\n", r == 0 ? "0" : strerror(errno));
    struct pollfd p = {s, POLLOUT, 0};
    int pr = poll(&p, 1, 5000);
    int err = -1; socklen_t el = sizeof err;
    getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el);
    printf("poll: %d revents=%#x so_error=%d\n", pr, p.revents, err);
    printf("flags: nonblock=%d cloexec=%d\n", !!(fcntl(s, F_GETFL) & O_NONBLOCK), !!(fcntl(s, F_GETFD) & FD_CLOEXEC));
    struct sockaddr_in peer; socklen_t pl = sizeof peer;
    if (getpeername(s, (struct sockaddr *)&peer, &pl) == 0) {
        char b[64]; inet_ntop(AF_INET, &peer.sin_addr, b, sizeof b);
        printf("peer: %s:%d\n", b, ntohs(peer.sin_port));
    } else failed("peer");
    if (write(s, "nb", 2) == 2) ok("write", "2"); else failed("write");
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) printf("reconnect: FAILED %s\n", strerror(errno));
    int b = socket(AF_INET, SOCK_STREAM, 0);  /* blocking, no cloexec */
    int one = 1;
    setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(b, (struct sockaddr *)&a, sizeof a) < 0) failed("blocking connect");
    else ok("blocking connect", "0");
    int nd = 0; socklen_t nl = sizeof nd;
    getsockopt(b, IPPROTO_TCP, TCP_NODELAY, &nd, &nl);
    printf("blocking flags: nonblock=%d cloexec=%d nodelay=%d\n", !!(fcntl(b, F_GETFL) & O_NONBLOCK),
           !!(fcntl(b, F_GETFD) & FD_CLOEXEC), nd);
    if (write(b, "bl", 2) == 2) ok("write", "2"); else failed("write");
    thread_target = a;
    pthread_t t;
    pthread_create(&t, 0, thread_connect, 0);
    pthread_join(t, 0);
    return 0;
}

/* Children that each start a blocking connect to a black hole, killed
 * after 2 ms: `rounds` times. */
static int connect_hang(const char *host, int port, int rounds)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    for (int i = 0; i < rounds; i++) {
        pid_t c = fork();
        if (c == 0) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            connect(s, (struct sockaddr *)&a, sizeof a);
            _exit(0);
        }
        struct timespec t = {0, 2000000};
        nanosleep(&t, 0);
        kill(c, SIGKILL);
        waitpid(c, 0, 0);
    }
    ok("hang", "done");
    return 0;
}

/* Many connects in flight at once from one process's threads (forks here):
 * how many does the supervisor take? */
static int connect_burst(const char *host, int port, int n)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    int eagain = 0, other = 0;
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (fork() == 0) {
            int bs = socket(AF_INET, SOCK_STREAM, 0);
            connect(bs, (struct sockaddr *)&a, sizeof a);
            _exit(0);
        }
        (void)s;
    }
    struct timespec t = {0, 300000000};
    nanosleep(&t, 0);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0 && errno == EAGAIN) eagain++;
    else other++;
    printf("burst: OK eagain=%d other=%d\n", eagain, other);
    fflush(stdout);
    return 0;
}

/* bind an abstract unix name and serve it for `secs` seconds */
static int abstract_bind(const char *name, int secs)
{
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t n = strlen(name);
    memcpy(a.sun_path + 1, name, n);
    if (bind(s, (struct sockaddr *)&a, offsetof(struct sockaddr_un, sun_path) + 1 + n) < 0) {
        failed("abstract bind");
        return 0;
    }
    listen(s, 4);
    ok("abstract bind", name);
    struct pollfd p = {s, POLLIN, 0};
    if (poll(&p, 1, secs * 1000) > 0) {
        int c = accept(s, 0, 0);
        char buf[64] = {0};
        read(c, buf, sizeof buf - 1);
        printf("abstract got: %s\n", buf);
        write(c, "FORGED", 6);
    } else printf("abstract got: nothing\n");
    fflush(stdout);
    return 0;
}

/* Host network details through AF_UNIX socket ioctls */
static int if_ioctls(void)
{
    int s = socket(AF_UNIX, SOCK_DGRAM, 0);
    char buf[4096];
    struct ifconf ifc = {.ifc_len = sizeof buf, .ifc_buf = buf};
    if (ioctl(s, SIOCGIFCONF, &ifc) < 0) { failed("ifconf"); return 0; }
    int n = ifc.ifc_len / (int)sizeof(struct ifreq);
    printf("ifconf: OK %d\n", n);
    for (int i = 0; i < n; i++) {
        struct ifreq *r = &ifc.ifc_req[i];
        char a[64];
        inet_ntop(AF_INET, &((struct sockaddr_in *)&r->ifr_addr)->sin_addr, a, sizeof a);
        printf("if: %s %s\n", r->ifr_name, a);
    }
    /* every interface name the host might have, by index */
    for (int idx = 1; idx < 64; idx++) {
        struct ifreq r = {.ifr_ifindex = idx};
        if (ioctl(s, SIOCGIFNAME, &r) < 0) continue;
        printf("ifname: %d %s\n", idx, r.ifr_name);
        if (ioctl(s, SIOCGIFHWADDR, &r) == 0) {
            unsigned char *m = (unsigned char *)r.ifr_hwaddr.sa_data;
            printf("hwaddr: %s %02x:%02x:%02x:%02x:%02x:%02x\n", r.ifr_name, m[0], m[1], m[2], m[3], m[4], m[5]);
        }
        struct ethtool_drvinfo d = {.cmd = ETHTOOL_GDRVINFO};
        r.ifr_data = (void *)&d;
        if (ioctl(s, SIOCETHTOOL, &r) == 0) printf("driver: %s %s\n", r.ifr_name, d.driver);
    }
    fflush(stdout);
    return 0;
}

/* `n` cheap denials (each one an event), then one mount attempt */
static int deny_flood(long n)
{
    for (long i = 0; i < n; i++) syscall(SYS_acct, 0);
    mount("zviz-flood-marker", "/mnt", "tmpfs", 0, 0);
    ok("flood", "done");
    return 0;
}

/* keep mmap_lock busy (fork over many mappings, in a loop: fork holds the
 * forking process's mmap_lock for writing while it copies them) while a
 * second thread of the same process floods a denied call whose string
 * argument is decoded */
static volatile int storm_end;
static long storm_calls;
static int storm_denied = 1;
static int storm_port; /* non-zero: the flood connects to 127.0.0.1:storm_port instead */
static long storm_connected;

static void *storm_flood(void *arg)
{
    (void)arg;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(storm_port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    while (!storm_end) {
        if (storm_port) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            storm_connected += connect(s, (struct sockaddr *)&a, sizeof a) == 0;
            close(s);
        } else if (storm_denied)
            mount("zviz-storm", "/mnt", "tmpfs", 0, 0);
        else
            getppid(); /* the control: the same storm, no denials */
        storm_calls++;
    }
    return 0;
}

static int mmap_lock_storm(int secs, int maps)
{
    for (int i = 0; i < maps; i++) {
        void *p = mmap(0, 4096, (i & 1) ? PROT_READ : PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) { failed("mmap"); break; }
        *(volatile char *)p;
    }
    pthread_t t;
    pthread_create(&t, 0, storm_flood, 0);
    time_t end = time(0) + secs;
    long forks = 0;
    while (time(0) < end) {
        pid_t c = fork();
        if (c == 0) _exit(0);
        if (c > 0) { waitpid(c, 0, 0); forks++; }
    }
    storm_end = 1;
    pthread_join(t, 0);
    printf("storm: OK %ld calls %ld forks %ld connected\n", storm_calls, forks, storm_connected);
    return 0;
}

/* a chain of `depth` processes, the deepest makes `n` denied calls */
static int deep_chain(int depth, int n)
{
    for (int i = 0; i < depth; i++) {
        pid_t c = fork();
        if (c < 0) { failed("fork"); break; }
        if (c > 0) { waitpid(c, 0, 0); _exit(0); }
    }
    for (int i = 0; i < n; i++) syscall(SYS_acct, 0);
    ok("chain", "done");
    return 0;
}

/* setsid, then a denial: whose is it? */
static int setsid_deny(void)
{
    pid_t c = fork();
    if (c == 0) {
        if (setsid() < 0) failed("setsid");
        syscall(SYS_acct, 0);
        syscall(SYS_acct, 0);
        _exit(0);
    }
    waitpid(c, 0, 0);
    syscall(SYS_acct, 0);
    ok("setsid", "done");
    return 0;
}

/* A thread flips the port of the sockaddr that connect() is given between an
 * allowed and a forbidden one while the main thread connects over and over.
 * Prints how many connects succeeded and were refused; a connect that reached
 * the forbidden port fails the attack's check at once. */
static volatile uint16_t *flip_port;
static volatile int flip_stop;
static uint16_t flip_a, flip_b;
static void *flipper(void *arg)
{
    (void)arg;
    while (!flip_stop) {
        *flip_port = flip_a;
        *flip_port = flip_b;
    }
    return NULL;
}
static int connect_flip(const char *host, int allowed, int forbidden, int n)
{
    struct sockaddr_in *a = calloc(1, sizeof *a);
    a->sin_family = AF_INET;
    inet_pton(AF_INET, host, &a->sin_addr);
    flip_port = &a->sin_port;
    flip_a = htons(allowed);
    flip_b = htons(forbidden);
    pthread_t t;
    pthread_create(&t, NULL, flipper, NULL);
    int good = 0, refused = 0, other = 0;
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        int r = connect(s, (struct sockaddr *)a, sizeof *a);
        if (r == 0) {
            struct sockaddr_in peer;
            socklen_t len = sizeof peer;
            getpeername(s, (struct sockaddr *)&peer, &len);
            if (peer.sin_port != flip_a) { printf("flip: FAILED connected to port %d\n", ntohs(peer.sin_port)); return 1; }
            good++;
        } else if (errno == EACCES) {
            refused++;
        } else {
            other++;
        }
        close(s);
    }
    flip_stop = 1;
    pthread_join(t, NULL);
    printf("flip: OK good=%d refused=%d other=%d\n", good, refused, other);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) return 2;
    const char *c = argv[1];
    if (!strcmp(c, "listen")) return listen_autobind(atoi(argv[2]), atoi(argv[3]));
    if (!strcmp(c, "rthdr")) return rthdr_connect(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]));
    if (!strcmp(c, "semantics")) return connect_semantics(argv[2], atoi(argv[3]));
    if (!strcmp(c, "hang")) return connect_hang(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (!strcmp(c, "flip")) return connect_flip(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    if (!strcmp(c, "burst")) return connect_burst(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (!strcmp(c, "abstract")) return abstract_bind(argv[2], atoi(argv[3]));
    if (!strcmp(c, "ifioctl")) return if_ioctls();
    if (!strcmp(c, "flood")) return deny_flood(atol(argv[2]));
    if (!strcmp(c, "storm")) {
        storm_denied = argc > 4 ? atoi(argv[4]) : 1;
        storm_port = argc > 5 ? atoi(argv[5]) : 0;
        return mmap_lock_storm(atoi(argv[2]), atoi(argv[3]));
    }
    if (!strcmp(c, "chain")) return deep_chain(atoi(argv[2]), atoi(argv[3]));
    if (!strcmp(c, "setsid")) return setsid_deny();
    return 2;
}
