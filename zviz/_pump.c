/*
 * zviz/_pump.c: a sandbox's seccomp notifications, received by a thread of
 * their own, with the allowed connect answered there (net.mode = "allow").
 *
 * Why C, and why a thread: a connect the sandbox may make is performed by
 * the supervisor (its own socket, from the host's network, put in place of
 * the child's by SECCOMP_ADDFD). Done by the Python supervisor it cost
 * ~0.7-1.0 ms per connect: a worker thread to read the sockaddr (never on the
 * event loop: a sandbox can hold its mmap_lock), a task, a dozen Python
 * calls. The same steps in C, in a thread that does nothing else, take
 * ~0.05 ms (docs/performance.md, "Round 12").
 *
 * What the thread does, for one listener:
 * - it waits on the listener (and on `stop_fd`), receives each notification;
 * - a connect to an endpoint of the allow table, by the x86_64 ABI, on an
 *   unconnected TCP socket of the same family as the address: it reads the
 *   sockaddr, takes the child's socket (pidfd_getfd) to learn its flags and
 *   the options to carry over, connects a socket of its own and installs it
 *   at the child's fd number, and answers. A record CONNECTED tells Python;
 * - everything else, and every case above that is not plain (an address it
 *   cannot read, a socket that is not what it expects, a host fd shortage,
 *   a blocking connect still in progress), is handed to Python unchanged
 *   (record NOTIF, or INPROGRESS with the socket and pidfd, by SCM_RIGHTS,
 *   for Python to finish): Python's supervisor (zviz/_supervisor.py) stays the one place
 *   that decides refusals, writes events and handles the rare cases;
 * - when no task of the filter is left (POLLHUP) it says HUP and ends; told
 *   to stop (stop_fd readable) it ends too.
 *
 * Direct egress (net.mode = "domains", way "direct", docs/network.md): the
 * table maps the sandbox's own addresses for allowed names (its DNS answers,
 * 198.18.0.0/15) and ports to the checked address of that name; such a
 * connect is made to the real address, completed here (or by Python), and
 * its sends are held by the gate (zviz/_gate.c) until Python has checked
 * the first flight (record GATED, with the socket and the capture pair). A
 * connect to any other IPv4/IPv6 address is the sandbox's own business
 * inside its network namespace (its loopback, where every address is
 * local): a socket made there (the thread enters the namespace for the
 * socket() call) is connected and installed the same way, TCP or UDP (its
 * resolver's connect to the DNS port), so no connect is ever CONTINUEd.
 *
 * Nothing here decides more than Python would: a connect is performed only
 * if Python's `_decide.decide_connect` would perform it (the same table, the
 * same address comparison); all else goes to Python. The sockaddr is read
 * once, and the connect goes to the address read (a copy in our memory): the
 * child changing its memory afterwards changes nothing.
 *
 * Blocking: a read of the child's memory can wait for its mmap_lock. It
 * waits in this thread, which serves only this sandbox's listener: the
 * sandbox can delay its own notifications, no one else's. The thread holds
 * its own duplicates of the fds it uses; the shared state (the table, the
 * reference count) is freed by whoever lets go last.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <time.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/netlink.h>
#include <linux/sockios.h>
#include <unistd.h>

#include "_flight.h"
#include "_gate.h"
#include "_pump.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif
#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif

#define BLOCKING_WAIT_MS 2 /* how long a blocking connect is waited for here, before Python takes it */

struct endpoint {
    unsigned char addr[16]; /* IPv6, or IPv4 mapped (::ffff:a.b.c.d) */
    uint16_t port;          /* host order */
    unsigned char to[16];   /* where it goes (allow mode: the same) */
    uint16_t to_port;
    int32_t name;           /* direct egress: the name's id (gated), else -1 */
};

/* A name checked by Python (zviz/_egressdirect.py): its id, the sandbox's address for it, until when. */
struct name {
    char text[256];
    unsigned char fake[4];
    int32_t id;
    int64_t until_ns; /* CLOCK_MONOTONIC */
};

#define MAX_CHECKS 64      /* first flights read here at once; past it Python reads them */
#define CHECK_WINDOW_MS 100 /* how long one is waited for here before Python takes it (with its own timeout) */
#define MAX_FAST_FLIGHT 8192 /* larger first flights are Python's: this one must fit an empty send buffer */

/* A connection out whose first flight waits in the gate's capture socket. */
struct check {
    int sock, capture, spare; /* ours (the program has its own), the capture pair */
    int32_t name, port;
    unsigned char key[48];
    int64_t deadline_ns;
    struct seccomp_notif notif;
};

struct pump {
    int listener, out, stop;
    int netns, hostns;      /* direct egress: the sandbox's network namespace and ours, else -1 */
    int gate;               /* direct egress: the gate's map (zviz/_gate.c), else -1 */
    uint64_t netns_cookie;  /* direct egress: SO_NETNS_COOKIE of the sandbox's namespace */
    int refs;               /* the thread's and Python's */
    pthread_mutex_t lock;   /* guards refs, the table and the budget */
    struct endpoint *table;
    size_t count;
    long budget;            /* direct egress: gated connects it may still make (Python gives them back) */
    int dns[2];             /* direct egress: the sandbox's DNS sockets (IPv4, IPv6), else -1 */
    struct name *names;     /* direct egress: the names checked, their addresses (guarded by lock) */
    size_t n_names;
    struct check checks[MAX_CHECKS]; /* direct egress: first flights being read (this thread's own) */
    int n_checks;
    int sockets_ns;    /* the blank network namespace (zviz/_netns.py): the sandbox's own, where the thread
                        * makes its sockets (it lives there), else -1 */
    int sockets_allow; /* which calls the policy allows: 1 socket, 2 socketpair */
    struct tally *sockets_live; /* how many live sockets that namespace holds, shared by its pumps */
};

static int64_t
now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* The tally of a sandbox's own namespace, shared by every pump that makes sockets there (one per
 * listener: a sandbox without a zygote has one per run, and runs go at once): a tally of each
 * pump's own let each make the cap's worth (test_blank_netns_review2.py). At least how many live
 * sockets the namespace holds; recounted when it would pass the cap. */
struct tally {
    struct tally *next;
    ino_t ino;
    int refs;
    long live;    /* made, or about to be: at least how many */
    long pending; /* of which room taken for sockets not made yet (a recount does not see them) */
};
static struct tally *tallies;
static pthread_mutex_t tallies_lock = PTHREAD_MUTEX_INITIALIZER;

static struct tally *
tally_get(int ns)
{
    struct stat st;
    if (fstat(ns, &st))
        return NULL;
    pthread_mutex_lock(&tallies_lock);
    struct tally *t = tallies;
    while (t && t->ino != st.st_ino)
        t = t->next;
    if (!t && (t = calloc(1, sizeof *t))) {
        t->ino = st.st_ino;
        t->next = tallies;
        tallies = t;
    }
    if (t) {
        t->refs++;
        t->live = PUMP_MAX_LIVE_SOCKETS; /* (the next one recounts: Python made this listener's first) */
    }
    pthread_mutex_unlock(&tallies_lock);
    return t;
}

static void
tally_put(struct tally *t)
{
    pthread_mutex_lock(&tallies_lock);
    if (!--t->refs) {
        struct tally **at = &tallies;
        while (*at != t)
            at = &(*at)->next;
        *at = t->next;
        free(t);
    }
    pthread_mutex_unlock(&tallies_lock);
}

/* Takes room for `need` sockets (the caller is in the tally's namespace): 0, or -1 past the cap. */
static int
tally_take(struct tally *t, long need)
{
    pthread_mutex_lock(&tallies_lock);
    if (t->live + need > PUMP_MAX_LIVE_SOCKETS) {
        long now = count_sockets_here();
        t->live = now < 0 ? PUMP_MAX_LIVE_SOCKETS : now + t->pending;
    }
    int ok = t->live + need <= PUMP_MAX_LIVE_SOCKETS;
    if (ok) {
        t->live += need;
        t->pending += need;
    } else {
        t->live = PUMP_MAX_LIVE_SOCKETS; /* (Python, which refuses it, makes it if some closed meanwhile) */
    }
    pthread_mutex_unlock(&tallies_lock);
    return ok ? 0 : -1;
}

/* The sockets `tally_take` made room for are made (or failed: their room stays taken until a recount). */
static void
tally_made(struct tally *t, long need)
{
    pthread_mutex_lock(&tallies_lock);
    t->pending -= need;
    pthread_mutex_unlock(&tallies_lock);
}

static void
release(struct pump *p)
{
    pthread_mutex_lock(&p->lock);
    int left = --p->refs;
    pthread_mutex_unlock(&p->lock);
    if (left)
        return;
    close(p->listener);
    close(p->out);
    close(p->stop);
    if (p->netns >= 0)
        close(p->netns);
    if (p->hostns >= 0)
        close(p->hostns);
    if (p->gate >= 0)
        close(p->gate);
    if (p->sockets_ns >= 0)
        close(p->sockets_ns);
    if (p->sockets_live)
        tally_put(p->sockets_live);
    for (int i = 0; i < 2; i++)
        if (p->dns[i] >= 0)
            close(p->dns[i]);
    for (int i = 0; i < p->n_checks; i++) {
        close(p->checks[i].sock);
        close(p->checks[i].capture);
        close(p->checks[i].spare);
    }
    free(p->names);
    free(p->table);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

/* The table's entry for (addr, port) in *e: 1, or 0 if none. A gated
 * (direct egress) entry takes one connect of the budget: -1 if none is left. */
static int
lookup(struct pump *p, const unsigned char addr[16], uint16_t port, struct endpoint *e)
{
    int found = 0;
    pthread_mutex_lock(&p->lock);
    for (size_t i = 0; i < p->count && !found; i++) {
        if (p->table[i].port == port && !memcmp(p->table[i].addr, addr, 16)) {
            *e = p->table[i];
            found = 1;
        }
    }
    if (found && e->name >= 0) {
        if (p->budget > 0)
            p->budget--;
        else
            found = -1;
    }
    pthread_mutex_unlock(&p->lock);
    return found;
}

static void
give_back(struct pump *p)
{
    pthread_mutex_lock(&p->lock);
    p->budget++;
    pthread_mutex_unlock(&p->lock);
}

/* Send one record, waiting for room (or for stop: then -1). `fds` (up to
 * three, or NULL) travel with it by SCM_RIGHTS: a record never read (Python
 * closed its end meanwhile) takes them with it when the kernel drops it. */
static int
emit_fds(struct pump *p, const struct pump_record *r, const int *fds, int nfds)
{
    union {
        char buf[CMSG_SPACE(3 * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {(void *)r, sizeof *r};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds) {
        memset(&control, 0, sizeof control);
        m.msg_control = control.buf;
        m.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(h), fds, nfds * sizeof(int));
    }
    for (;;) {
        if (sendmsg(p->out, &m, MSG_DONTWAIT | MSG_NOSIGNAL) == (ssize_t)sizeof *r)
            return 0;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            return -1; /* Python's end is closed */
        struct pollfd w[2] = {{.fd = p->out, .events = POLLOUT}, {.fd = p->stop, .events = POLLIN}};
        if (poll(w, 2, -1) < 0 && errno != EINTR)
            return -1;
        if (w[1].revents)
            return -1;
    }
}

static int
emit(struct pump *p, const struct pump_record *r)
{
    return emit_fds(p, r, NULL, 0);
}

static int
id_valid(struct pump *p, uint64_t id)
{
    return ioctl(p->listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0;
}

static void
answer(struct pump *p, uint64_t id, int err)
{
    struct seccomp_notif_resp resp;
    memset(&resp, 0, sizeof resp);
    resp.id = id;
    resp.error = err ? -err : 0;
    ioctl(p->listener, SECCOMP_IOCTL_NOTIF_SEND, &resp); /* ENOENT: the task is gone */
}

/* A pidfd for the notifying task: a thread pidfd (any thread may notify;
 * only a thread-group leader has a process pidfd), else the process's. */
static int
task_pidfd(pid_t tid)
{
    int fd = syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
    if (fd < 0 && errno == EINVAL)
        fd = syscall(SYS_pidfd_open, tid, 0);
    return fd;
}

/* close-on-exec of fd `fd` of task `tid`, from its fdinfo; -1 if unknown. */
static int
fd_cloexec(pid_t tid, int fd)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/fdinfo/%d", (int)tid, fd);
    int f = open(path, O_RDONLY | O_CLOEXEC);
    if (f < 0)
        return -1;
    ssize_t n = read(f, buf, sizeof buf - 1);
    close(f);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *flags = strstr(buf, "flags:");
    if (!flags)
        return -1;
    return (strtoul(flags + 6, NULL, 8) & O_CLOEXEC) != 0;
}

static const struct {
    int level, name;
} carried[] = {
    {IPPROTO_TCP, TCP_NODELAY}, {SOL_SOCKET, SO_KEEPALIVE}, {IPPROTO_TCP, TCP_KEEPIDLE},
    {IPPROTO_TCP, TCP_KEEPINTVL}, {IPPROTO_TCP, TCP_KEEPCNT},
};
#define N_CARRIED (sizeof carried / sizeof carried[0])

/* A socket of `family`/`type` in the sandbox's network namespace (direct
 * egress: the thread enters it for the socket() call only), or -1. */
static int
socket_inside(struct pump *p, int family, int type)
{
    if (setns(p->netns, CLONE_NEWNET))
        return -1;
    int s = socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int e = errno;
    if (setns(p->hostns, CLONE_NEWNET))
        abort(); /* cannot happen (it is our own namespace); going on would make host sockets in theirs */
    errno = e;
    return s;
}

/* Wait at most BLOCKING_WAIT_MS for `sock`'s connect: its outcome, or
 * EINPROGRESS. */
static int
settle(int sock)
{
    struct pollfd w = {.fd = sock, .events = POLLOUT};
    if (poll(&w, 1, BLOCKING_WAIT_MS) != 1)
        return EINPROGRESS;
    int err = 0;
    socklen_t elen = sizeof err;
    if (getsockopt(sock, SOL_SOCKET, SO_ERROR, &err, &elen))
        return errno;
    return err;
}

/* Record `r` (with `err`) for Python; a connect inside the sandbox's namespace
 * (`found` 0) is not worth a wake-up of Python's. */
static void
tell(struct pump *p, struct pump_record *r, int found, int err)
{
    r->err = err;
    if (found)
        emit(p, r);
}

/*
 * Try to perform a connect. Returns 1 if the notification was dealt with
 * here (answered, or its task gone), 0 to hand it to Python as it is; a
 * connect in progress for Python to wait for is handed over with its socket
 * (record INPROGRESS).
 */
static int
fast_connect(struct pump *p, const struct seccomp_notif *n)
{
    if (n->data.arch != AUDIT_ARCH_X86_64 || n->data.nr != SYS_connect)
        return 0;
    uint32_t addrlen = (uint32_t)n->data.args[2];
    int target_fd = (int)(uint32_t)n->data.args[0];
    if (addrlen < sizeof(struct sockaddr_in) || addrlen > 128 || target_fd < 0)
        return 0;
    unsigned char sa[sizeof(struct sockaddr_in6)];
    size_t want = addrlen < sizeof sa ? addrlen : sizeof sa;
    struct iovec local = {sa, want}, remote = {(void *)(uintptr_t)n->data.args[1], want};
    if (process_vm_readv(n->pid, &local, 1, &remote, 1, 0) != (ssize_t)want)
        return 0;
    if (!id_valid(p, n->id))
        return 1; /* what was read may not be the task's any more: it is gone */
    sa_family_t family;
    memcpy(&family, sa, sizeof family);
    unsigned char addr[16];
    uint16_t port_be;
    memcpy(&port_be, sa + 2, 2);
    if (family == AF_INET) {
        memset(addr, 0, 10);
        addr[10] = addr[11] = 0xff;
        memcpy(addr + 12, sa + 4, 4);
    } else if (family == AF_INET6 && want >= 24) {
        memcpy(addr, sa + 8, 16);
    } else {
        return 0;
    }
    uint16_t port = ntohs(port_be);
    if (port == 0)
        return 0;
    struct endpoint e;
    int found = lookup(p, addr, port, &e);
    if (found < 0)
        return 0; /* no connect left in its budget: Python refuses, with the event */
    int gated = found && e.name >= 0;
    if (!found && p->netns < 0)
        return 0; /* allow mode: not listed, Python refuses */
    /* (direct egress, not in the table: the sandbox's own namespace) */

    int handled = 0, theirs = -1, sock = -1, pidfd = task_pidfd(n->pid);
    if (pidfd < 0)
        goto out;
    if (!id_valid(p, n->id)) { /* the pidfd may name another task */
        handled = 1;
        goto out;
    }
    theirs = syscall(SYS_pidfd_getfd, pidfd, target_fd, 0);
    if (theirs < 0)
        goto out;
    int type = 0, domain = 0, listening = 1;
    socklen_t len = sizeof type;
    if (getsockopt(theirs, SOL_SOCKET, SO_TYPE, &type, &len) ||
        !(type == SOCK_STREAM || (type == SOCK_DGRAM && !found)))
        goto out;
    len = sizeof domain;
    if (getsockopt(theirs, SOL_SOCKET, SO_DOMAIN, &domain, &len) || domain != family)
        goto out;
    if (type == SOCK_STREAM) {
        len = sizeof listening;
        if (getsockopt(theirs, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) || listening)
            goto out;
        struct sockaddr_storage peer;
        len = sizeof peer;
        if (getpeername(theirs, (struct sockaddr *)&peer, &len) == 0 || errno != ENOTCONN)
            goto out; /* connected: Python answers EISCONN */
    }
    if (!found) { /* inside: a socket bound beforehand keeps its binding only if it is its own */
        struct sockaddr_storage me;
        len = sizeof me;
        if (getsockname(theirs, (struct sockaddr *)&me, &len))
            goto out;
        uint16_t bound_port;
        memcpy(&bound_port, (char *)&me + 2, 2);
        if (bound_port)
            goto out; /* bound before its connect: Python refuses (the event says why) */
    }
    int fl = fcntl(theirs, F_GETFL);
    if (fl < 0)
        goto out;
    int nonblocking = (fl & O_NONBLOCK) != 0;
    int cloexec = fd_cloexec(n->pid, target_fd);
    if (cloexec < 0)
        goto out;
    int values[N_CARRIED];
    for (size_t i = 0; i < N_CARRIED; i++) {
        values[i] = 0;
        len = sizeof values[i];
        if (type == SOCK_STREAM && getsockopt(theirs, carried[i].level, carried[i].name, &values[i], &len))
            goto out;
    }
    close(theirs);
    theirs = -1;

    sock = found ? socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0) : socket_inside(p, family, type);
    if (sock < 0)
        goto out; /* EMFILE and the like: Python's path names the shortage */
    for (size_t i = 0; i < N_CARRIED; i++)
        if (values[i] && setsockopt(sock, carried[i].level, carried[i].name, &values[i], sizeof values[i]))
            goto out;
    const unsigned char *to = found ? e.to : addr;
    static const unsigned char v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (family == AF_INET && memcmp(to, v4mapped, 12)) {
        handled = 0; /* an IPv4 socket and an address that is not IPv4: Python refuses it */
        goto out;
    }
    uint16_t to_port_be = found ? htons(e.to_port) : port_be;
    int err;
    if (family == AF_INET) {
        struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = to_port_be};
        memcpy(&dst.sin_addr, to + 12, 4);
        err = connect(sock, (struct sockaddr *)&dst, sizeof dst) ? errno : 0;
    } else {
        struct sockaddr_in6 dst = {.sin6_family = AF_INET6, .sin6_port = to_port_be};
        memcpy(&dst.sin6_addr, to, 16);
        err = connect(sock, (struct sockaddr *)&dst, sizeof dst) ? errno : 0;
    }
    /* A blocking connect, or a gated one (the gate takes only a connected
     * socket): a near host (loopback, the LAN) answers within
     * BLOCKING_WAIT_MS; one that has not answered by then is Python's to
     * wait for (with the task's pidfd and its timeout), not ours. */
    if (err == EINPROGRESS && (!nonblocking || gated))
        err = settle(sock);
    if (err == EINPROGRESS && (!nonblocking || gated)) {
        struct pump_record r = {.kind = PUMP_INPROGRESS, .notif = *n, .fd = target_fd, .cloexec = cloexec,
                                .name = gated ? e.name : -1, .port = port};
        int fds[2] = {sock, pidfd};
        emit_fds(p, &r, fds, 2); /* Python gets its own sock and pidfd (or none: it is closing) */
        handled = 1;
        gated = 0; /* (Python gives the budget back when that connection ends) */
        goto out;
    }
    handled = 1;
    int capture[2] = {-1, -1};
    /* name: -1 allow mode, -2 inside the sandbox's namespace (direct egress) */
    struct pump_record r = {.kind = PUMP_CONNECTED, .notif = *n, .fd = target_fd, .name = found ? -1 : -2,
                            .port = port};
    /* (Python is told before the program is answered: its figures are whole once the program is done) */
    if (err && err != EINPROGRESS) {
        tell(p, &r, found, err);
        answer(p, n->id, err);
        goto closing;
    }
    if (gated) {
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, capture) ||
            gate_add(p->gate, sock, capture[0], (struct gate_key *)r.key)) {
            r.kind = PUMP_GATE_FAILED;
            tell(p, &r, 1, errno ? errno : EIO);
            answer(p, n->id, EAGAIN); /* (an event from Python says why) */
            goto closing;
        }
    }
    if (!nonblocking) {
        int f = fcntl(sock, F_GETFL);
        fcntl(sock, F_SETFL, f & ~O_NONBLOCK);
    }
    struct seccomp_notif_addfd add = {.id = n->id, .flags = SECCOMP_ADDFD_FLAG_SETFD, .srcfd = (uint32_t)sock,
                                      .newfd = (uint32_t)target_fd, .newfd_flags = cloexec ? O_CLOEXEC : 0};
    int gone = 0;
    if (ioctl(p->listener, SECCOMP_IOCTL_NOTIF_ADDFD, &add) < 0) {
        if (errno == ENOENT)
            gone = 1; /* the task is gone: nothing to answer */
        else
            err = errno; /* EBADF: its RLIMIT_NOFILE is below the fd, say */
    }
    if (gated && (gone || err)) {
        struct gate_key k;
        memcpy(&k, r.key, sizeof k);
        gate_remove_one(p->gate, &k);
        k.kind = GATE_CAPTURE;
        gate_remove_one(p->gate, &k);
    }
    if (gone)
        goto closing;
    if (!gated || err)
        tell(p, &r, found, err);
    answer(p, n->id, err);
    if (gated && !err) {
        /* Its first flight is checked here if it comes soon and plainly, else by Python (record GATED) */
        r.name = e.name;
        if (p->n_checks < MAX_CHECKS) {
            struct check *c = &p->checks[p->n_checks++];
            c->sock = sock, c->capture = capture[0], c->spare = capture[1];
            c->name = e.name, c->port = port;
            memcpy(c->key, r.key, sizeof c->key);
            c->deadline_ns = now_ns() + CHECK_WINDOW_MS * 1000000LL;
            c->notif = *n;
            sock = capture[0] = capture[1] = -1; /* (the check owns them now) */
        } else {
            r.kind = PUMP_GATED;
            int fds[3] = {sock, capture[0], capture[1]};
            emit_fds(p, &r, fds, 3);
        }
        gated = 0; /* (Python gives the budget back when that connection ends) */
        goto closing;
    }
closing:
    if (capture[0] >= 0)
        close(capture[0]);
    if (capture[1] >= 0)
        close(capture[1]);
out:
    if (gated)
        give_back(p); /* that connect did not happen (or Python was told it failed) */
    if (theirs >= 0)
        close(theirs);
    if (sock >= 0)
        close(sock);
    if (pidfd >= 0)
        close(pidfd);
    return handled;
}

/*
 * Direct egress: listen() is notified, because a socket the sandbox was
 * handed (a connection of the host's, made for it) must never listen: on the
 * host's network it would be a server anyone there can reach. A socket of
 * the sandbox's own namespace listens as it asked (we call listen() on it:
 * no memory is read, the backlog is a register); anything else goes to
 * Python, which refuses it with an event. 1 if dealt with here.
 */
static int
fast_listen(struct pump *p, const struct seccomp_notif *n)
{
    if (p->netns < 0 || n->data.arch != AUDIT_ARCH_X86_64 || n->data.nr != SYS_listen)
        return 0;
    int target_fd = (int)(uint32_t)n->data.args[0];
    if (target_fd < 0)
        return 0;
    int handled = 0, theirs = -1, pidfd = task_pidfd(n->pid);
    if (pidfd < 0)
        return 0;
    if (!id_valid(p, n->id)) {
        handled = 1;
        goto out;
    }
    theirs = syscall(SYS_pidfd_getfd, pidfd, target_fd, 0);
    if (theirs < 0)
        goto out;
    uint64_t cookie = 0;
    socklen_t len = sizeof cookie;
    if (getsockopt(theirs, SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &len) || cookie != p->netns_cookie)
        goto out;
    int err = listen(theirs, (int)n->data.args[1]) ? errno : 0;
    answer(p, n->id, err);
    handled = 1;
out:
    if (theirs >= 0)
        close(theirs);
    close(pidfd);
    return handled;
}

/* ---- DNS: a query for a name Python has checked is answered here; every
 * other datagram goes to Python as it came (record DNS, with its sender). */

static void
serve_dns(struct pump *p, int which)
{
    for (int k = 0; k < 64; k++) {
        unsigned char q[513], out[600];
        struct sockaddr_storage from;
        socklen_t flen = sizeof from;
        ssize_t len = recvfrom(p->dns[which], q, sizeof q, MSG_DONTWAIT, (struct sockaddr *)&from, &flen);
        if (len < 0)
            return;
        char name[256];
        unsigned qtype = 0;
        size_t end = 0;
        int answered = 0;
        if (dns_query_name(q, (size_t)len, name, sizeof name, &qtype, &end) == 0) {
            unsigned char fake[4];
            int found = 0;
            int64_t now = now_ns();
            pthread_mutex_lock(&p->lock);
            for (size_t i = 0; i < p->n_names && !found; i++)
                if (p->names[i].until_ns > now && !strcmp(p->names[i].text, name)) {
                    memcpy(fake, p->names[i].fake, 4);
                    found = 1;
                }
            pthread_mutex_unlock(&p->lock);
            size_t n = found ? dns_answer(q, end, qtype, fake, out, sizeof out) : 0;
            if (n) {
                sendto(p->dns[which], out, n, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&from, flen);
                answered = 1;
            }
        }
        if (!answered) {
            struct {
                struct pump_record r;
                unsigned char from[28];
                unsigned char query[513];
            } m;
            memset(&m.r, 0, sizeof m.r);
            m.r.kind = PUMP_DNS;
            m.r.fd = which;
            m.r.err = (int32_t)len;
            m.r.name = -1;
            memset(m.from, 0, sizeof m.from);
            memcpy(m.from, &from, flen < sizeof m.from ? flen : sizeof m.from);
            memcpy(m.query, q, (size_t)len);
            struct iovec iov = {&m, sizeof m.r + sizeof m.from + (size_t)len};
            struct msghdr h = {.msg_iov = &iov, .msg_iovlen = 1};
            sendmsg(p->out, &h, MSG_DONTWAIT | MSG_NOSIGNAL); /* (Python's end full: the query is lost, as UDP may be) */
        }
    }
}

/* ---- first flights: a whole, plain one (zviz/_flight.c) is sent on here,
 * and the connection leaves the gate; anything else is Python's. */

static const char *
name_text(struct pump *p, int32_t id, char *buf, size_t size)
{
    const char *out = NULL;
    pthread_mutex_lock(&p->lock);
    for (size_t i = 0; i < p->n_names; i++)
        if (p->names[i].id == id) {
            snprintf(buf, size, "%s", p->names[i].text);
            out = buf;
            break;
        }
    pthread_mutex_unlock(&p->lock);
    return out;
}

static void
drop_check(struct pump *p, int i)
{
    p->checks[i] = p->checks[--p->n_checks];
}

static void
to_python(struct pump *p, int i)
{
    struct check *c = &p->checks[i];
    struct pump_record r = {.kind = PUMP_GATED, .notif = c->notif, .name = c->name, .port = c->port};
    memcpy(r.key, c->key, sizeof r.key);
    int fds[3] = {c->sock, c->capture, c->spare};
    emit_fds(p, &r, fds, 3);
    close(c->sock);
    close(c->capture);
    close(c->spare);
    drop_check(p, i);
}

static void
step_check(struct pump *p, int i)
{
    struct check *c = &p->checks[i];
    unsigned char buf[MAX_FAST_FLIGHT + 1]; /* (this thread's own: every sandbox has a pump) */
    ssize_t n = recv(c->capture, buf, sizeof buf, MSG_PEEK | MSG_DONTWAIT);
    char name[256];
    int verdict = FLIGHT_PYTHON;
    if (n > 0 && n <= MAX_FAST_FLIGHT && name_text(p, c->name, name, sizeof name))
        verdict = flight_check(buf, (size_t)n, name, c->port);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        verdict = FLIGHT_MORE;
    if (verdict == FLIGHT_MORE)
        return;
    if (verdict != FLIGHT_OK) {
        to_python(p, i);
        return;
    }
    struct gate_key k;
    memcpy(&k, c->key, sizeof k);
    /* The server's answer must not reach the program before the socket is out
     * of the gate: its next message (sent on that answer) would be held in the
     * capture socket, and lost with it. Its receive low-water mark keeps the
     * answer from it (recv and poll wait) until it is restored, which wakes it. */
    int lowat = 1;
    socklen_t llen = sizeof lowat;
    getsockopt(c->sock, SOL_SOCKET, SO_RCVLOWAT, &lowat, &llen);
    int hold = INT32_MAX;
    setsockopt(c->sock, SOL_SOCKET, SO_RCVLOWAT, &hold, sizeof hold);
    ssize_t sent = send(c->sock, buf, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
    k.kind = GATE_SOCKET;
    gate_remove_one(p->gate, &k); /* out of the gate: its next sends go straight out */
    int queued = 0;
    if (ioctl(c->capture, SIOCINQ, &queued) < 0)
        queued = 0;
    k.kind = GATE_CAPTURE;
    struct pump_record r = {.kind = PUMP_CHECKED, .notif = c->notif, .name = c->name, .port = c->port};
    memcpy(r.key, c->key, sizeof r.key);
    if (sent != n || queued > n) {
        /* sent more before the server answered (early data), or the send fell short: cut */
        struct linger l = {1, 0};
        setsockopt(c->sock, SOL_SOCKET, SO_LINGER, &l, sizeof l);
        shutdown(c->sock, SHUT_RDWR);
        r.kind = PUMP_CHECK_CUT;
        r.err = sent != n ? (sent < 0 ? errno : EIO) : 0;
    }
    gate_remove_one(p->gate, &k);
    setsockopt(c->sock, SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof lowat); /* (the answer reaches it now) */
    int fds[1] = {c->sock};
    emit_fds(p, &r, fds, 1); /* Python learns its cookie (for its end's byte counts), then lets go */
    close(c->sock);
    close(c->capture);
    close(c->spare);
    drop_check(p, i);
}

/*
 * The blank network namespace (zviz/_netns.py, zviz/_sockets.py): a socket()
 * or socketpair() the policy allows, of what the filter would let a sandbox
 * with a namespace of its own make in-kernel (a unix socket or pair, a
 * NETLINK_ROUTE socket: _argrules.MADE_SOCKETS, the family compared whole),
 * is made here, in the sandbox's own namespace where this thread lives, and
 * installed in the caller. Returns 1 if dealt with, 0 to hand it to Python
 * (refused and reported there). Nothing read from the child decides what is
 * made; a pair's numbers are written to the caller's memory, where it could
 * write them itself (its /proc/PID/maps says the page is writable: the mem
 * file would write through a read-only page).
 */
static int
addfd_new(struct pump *p, uint64_t id, int fd, int cloexec)
{
    struct seccomp_notif_addfd add = {.id = id, .srcfd = (uint32_t)fd, .newfd_flags = cloexec ? O_CLOEXEC : 0};
    int r = ioctl(p->listener, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
    return r < 0 ? -errno : r;
}

static void
answer_value(struct pump *p, uint64_t id, int64_t val)
{
    struct seccomp_notif_resp resp;
    memset(&resp, 0, sizeof resp);
    resp.id = id;
    resp.val = val;
    ioctl(p->listener, SECCOMP_IOCTL_NOTIF_SEND, &resp); /* ENOENT: the task is gone */
}

/* PROCMAP_QUERY (Linux 6.11, <linux/fs.h>): one mapping of /proc/PID/maps by address. */
struct zviz_procmap_query {
    uint64_t size, query_flags, query_addr, vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
    uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
    uint64_t vma_name_addr, build_id_addr;
};
#define ZVIZ_PROCMAP_QUERY _IOWR('f', 17, struct zviz_procmap_query)
#define ZVIZ_PROCMAP_WRITABLE 2

/* Whether [addr, addr+size) lies in writable mappings: 1, 0, or -1 where the
 * kernel cannot say by PROCMAP_QUERY (then the text is read). */
static int
query_writable(int fd, uint64_t addr, uint64_t end)
{
    while (addr < end) {
        struct zviz_procmap_query q = {.size = sizeof q, .query_addr = addr};
        if (ioctl(fd, ZVIZ_PROCMAP_QUERY, &q) < 0)
            return errno == ENOENT ? 0 : -1;
        if (q.vma_start > addr || !(q.vma_flags & ZVIZ_PROCMAP_WRITABLE))
            return 0;
        addr = q.vma_end;
    }
    return 1;
}

/* Whether [addr, addr+size) lies in writable mappings of /proc/PID/maps (`fd`). */
static int
maps_writable(int fd, uint64_t addr, uint64_t size)
{
    int quick = query_writable(fd, addr, addr + size < addr ? addr : addr + size);
    if (quick >= 0 && addr + size >= addr)
        return quick;
    char buf[8192];
    size_t have = 0;
    uint64_t end = addr + size;
    if (end < addr)
        return 0;
    for (;;) {
        ssize_t n = read(fd, buf + have, sizeof buf - 1 - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0;
        have += (size_t)n;
        buf[have] = 0;
        char *line = buf, *nl;
        while ((nl = memchr(line, '\n', have - (size_t)(line - buf)))) {
            *nl = 0;
            char *dash, *sp;
            uint64_t lo = strtoull(line, &dash, 16), hi = *dash == '-' ? strtoull(dash + 1, &sp, 16) : 0;
            if (*dash == '-' && *sp == ' ' && lo <= addr && addr < hi) {
                if (sp[2] != 'w')
                    return 0;
                if (end <= hi)
                    return 1;
                addr = hi; /* the rest must be in the next mapping, adjacent */
            }
            line = nl + 1;
        }
        have -= (size_t)(line - buf);
        memmove(buf, line, have);
        if (have == sizeof buf - 1)
            return 0; /* a line longer than the buffer: not a maps file we can read */
    }
}

/* A pair's numbers for the caller: 0, an errno to answer, or -1 (the task is gone). */
static int
install_pair(struct pump *p, const struct seccomp_notif *n, const int sv[2], int cloexec)
{
    char path[64];
    uint64_t addr = n->data.args[3];
    int nums[2] = {-1, -1}, err = EFAULT;
    snprintf(path, sizeof path, "/proc/%u/mem", n->pid);
    int mem = open(path, O_WRONLY | O_CLOEXEC);
    snprintf(path, sizeof path, "/proc/%u/maps", n->pid);
    int maps = open(path, O_RDONLY | O_CLOEXEC);
    /* opened first, then the notification checked pending: the files are the caller's, not a later tid's */
    if (!id_valid(p, n->id)) {
        err = -1;
    } else if (mem >= 0 && maps >= 0 && maps_writable(maps, addr, sizeof nums) &&
               pwrite(mem, nums, sizeof nums, (off_t)addr) == (ssize_t)sizeof nums) {
        err = 0;
        for (int i = 0; i < 2 && !err; i++) {
            nums[i] = addfd_new(p, n->id, sv[i], cloexec);
            if (nums[i] < 0)
                err = nums[i] == -ENOENT ? -1 : -nums[i]; /* (EMFILE on the second: the first is the caller's) */
        }
        /* (another thread of the caller may unmap it meanwhile: its two fds are then its own to find) */
        if (!err && pwrite(mem, nums, sizeof nums, (off_t)addr) != (ssize_t)sizeof nums)
            err = EFAULT;
    }
    if (mem >= 0)
        close(mem);
    if (maps >= 0)
        close(maps);
    return err;
}

/* The sockets of this thread's network namespace: /proc/thread-self/net/sockstat's
 * "sockets: used N", the kernel's per-namespace tally of every socket made from
 * user space and not yet freed (sk_alloc .. __sk_free: the kernel's own, made with
 * kern=1, not counted). Not /proc/net/unix + /proc/net/netlink: a netlink socket never
 * bound is in no table those list, so a sandbox could hold any number of them (found
 * by tests/escape/test_blank_netns_review2.py); and one read, whatever the count.
 * -1 if unreadable. */
long
count_sockets_here(void)
{
    int fd = open("/proc/thread-self/net/sockstat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char buf[512];
    ssize_t n;
    do
        n = read(fd, buf, sizeof buf - 1);
    while (n < 0 && errno == EINTR);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    static const char key[] = "sockets: used ";
    if (strncmp(buf, key, sizeof key - 1) != 0)
        return -1;
    char *end;
    errno = 0;
    long used = strtol(buf + sizeof key - 1, &end, 10);
    if (errno || end == buf + sizeof key - 1 || used < 0)
        return -1;
    return used;
}

static int
fast_socket(struct pump *p, const struct seccomp_notif *n)
{
    if (p->sockets_ns < 0 || n->data.arch != AUDIT_ARCH_X86_64)
        return 0;
    int pair = n->data.nr == SYS_socketpair;
    if (!((n->data.nr == SYS_socket && (p->sockets_allow & 1)) || (pair && (p->sockets_allow & 2))))
        return 0;
    const __u64 *a = n->data.args;
    __u64 kind = a[1] & ~(__u64)(SOCK_NONBLOCK | SOCK_CLOEXEC);
    int route = !pair && a[0] == AF_NETLINK && (kind == SOCK_DGRAM || kind == SOCK_RAW) && a[2] == NETLINK_ROUTE;
    if (a[0] != AF_UNIX && !route)
        return 0;
    int cloexec = (a[1] & SOCK_CLOEXEC) != 0;
    long need = pair ? 2 : 1;
    if (tally_take(p->sockets_live, need))
        return 0; /* Python refuses it, with an event that says why */
    int sv[2] = {-1, -1};
    int r = pair ? socketpair((int)a[0], (int)a[1], (int)a[2], sv) : (sv[0] = socket((int)a[0], (int)a[1], (int)a[2]));
    tally_made(p->sockets_live, need);
    if (r < 0) {
        answer(p, n->id, errno); /* the kernel's own answer: a bad type, its limits */
        return 1; /* (its room stays taken until a recount: at least how many) */
    }
    if (pair) {
        int err = install_pair(p, n, sv, cloexec);
        if (err >= 0)
            answer(p, n->id, err);
    } else {
        int num = addfd_new(p, n->id, sv[0], cloexec);
        if (num >= 0)
            answer_value(p, n->id, num);
        else if (num != -ENOENT)
            answer(p, n->id, -num);
    }
    for (int i = 0; i < 2; i++)
        if (sv[i] >= 0)
            close(sv[i]);
    return 1;
}

static void *
run(void *arg)
{
    struct pump *p = arg;
    /* The blank network namespace: this thread lives in the sandbox's own, where it makes its sockets. */
    if (p->sockets_ns >= 0 && setns(p->sockets_ns, CLONE_NEWNET)) {
        struct pump_record r = {.kind = PUMP_FAILED, .err = errno};
        emit(p, &r);
        release(p);
        return NULL;
    }
    for (;;) {
        struct pollfd w[4 + MAX_CHECKS] = {{.fd = p->listener, .events = POLLIN},
                                           {.fd = p->stop, .events = POLLIN},
                                           {.fd = p->dns[0], .events = POLLIN},
                                           {.fd = p->dns[1], .events = POLLIN}};
        int timeout = -1;
        int64_t now = now_ns();
        for (int i = 0; i < p->n_checks; i++) {
            w[4 + i] = (struct pollfd){.fd = p->checks[i].capture, .events = POLLIN};
            int64_t left = (p->checks[i].deadline_ns - now) / 1000000 + 1;
            if (timeout < 0 || left < timeout)
                timeout = left < 0 ? 0 : (int)left;
        }
        int n_checks = p->n_checks;
        if (poll(w, 4 + n_checks, timeout) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (w[1].revents)
            break;
        for (int i = n_checks; i-- > 0;) /* (from the end: a finished check takes the last one's place) */
            if (w[4 + i].revents)
                step_check(p, i);
        now = now_ns();
        for (int i = p->n_checks; i-- > 0;)
            if (p->checks[i].deadline_ns <= now)
                to_python(p, i); /* not here in time: Python waits for the rest, with its own timeout */
        for (int k = 0; k < 2; k++)
            if (w[2 + k].revents & POLLIN)
                serve_dns(p, k);
        if (w[0].revents & POLLIN) {
            struct seccomp_notif n;
            memset(&n, 0, sizeof n);
            if (ioctl(p->listener, SECCOMP_IOCTL_NOTIF_RECV, &n) < 0) {
                if (errno == ENOENT || errno == EINTR)
                    continue; /* the task died, or a signal */
                struct pump_record r = {.kind = PUMP_FAILED, .err = errno};
                emit(p, &r);
                break;
            }
            if (fast_socket(p, &n) || fast_connect(p, &n) || fast_listen(p, &n))
                continue;
            struct pump_record r = {.kind = PUMP_NOTIF, .notif = n, .name = -1};
            if (emit(p, &r) < 0)
                break;
        } else if (w[0].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            struct pump_record r = {.kind = PUMP_HUP};
            emit(p, &r);
            break;
        }
    }
    release(p);
    return NULL;
}

struct pump *
pump_start(int listener, int out, int stop, int netns, int gate, int dns4, int dns6, int sockets_ns,
           int sockets_allow, int *err)
{
    struct pump *p = calloc(1, sizeof *p);
    if (!p) {
        *err = ENOMEM;
        return NULL;
    }
    p->listener = fcntl(listener, F_DUPFD_CLOEXEC, 3);
    p->out = fcntl(out, F_DUPFD_CLOEXEC, 3);
    p->stop = fcntl(stop, F_DUPFD_CLOEXEC, 3);
    p->netns = p->hostns = p->gate = p->dns[0] = p->dns[1] = p->sockets_ns = -1;
    int ok = p->listener >= 0 && p->out >= 0 && p->stop >= 0;
    if (sockets_ns >= 0) { /* (never with direct egress: that thread moves between namespaces) */
        p->sockets_ns = netns < 0 ? fcntl(sockets_ns, F_DUPFD_CLOEXEC, 3) : -1;
        p->sockets_allow = sockets_allow;
        ok = ok && p->sockets_ns >= 0 && (p->sockets_live = tally_get(p->sockets_ns));
    }
    if (netns >= 0) {
        p->netns = fcntl(netns, F_DUPFD_CLOEXEC, 3);
        p->hostns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
        p->gate = fcntl(gate, F_DUPFD_CLOEXEC, 3);
        ok = ok && p->netns >= 0 && p->hostns >= 0 && p->gate >= 0;
        if (dns4 >= 0)
            ok = ok && (p->dns[0] = fcntl(dns4, F_DUPFD_CLOEXEC, 3)) >= 0;
        if (dns6 >= 0)
            ok = ok && (p->dns[1] = fcntl(dns6, F_DUPFD_CLOEXEC, 3)) >= 0;
        int probe = ok ? socket_inside(p, AF_UNIX, SOCK_DGRAM) : -1;
        socklen_t len = sizeof p->netns_cookie;
        ok = probe >= 0 && !getsockopt(probe, SOL_SOCKET, SO_NETNS_COOKIE, &p->netns_cookie, &len);
        if (probe >= 0)
            close(probe);
    }
    p->refs = 2;
    pthread_mutex_init(&p->lock, NULL);
    pthread_attr_t attr;
    pthread_t t;
    int rc = errno ? errno : EMFILE;
    if (ok && !(rc = pthread_attr_init(&attr))) {
        pthread_attr_setstacksize(&attr, 128 * 1024);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        rc = pthread_create(&t, &attr, run, p);
        pthread_attr_destroy(&attr);
    }
    if (!ok || rc) {
        *err = rc ? rc : EMFILE;
        p->refs = 1;
        release(p); /* (closing a -1 is harmless) */
        return NULL;
    }
    return p;
}

/* Put a new table in place (under the lock) and free the old one. */
static void
swap(struct pump *p, void **table, size_t *count, void *fresh, size_t n)
{
    pthread_mutex_lock(&p->lock);
    void *old = *table;
    *table = fresh;
    *count = n;
    pthread_mutex_unlock(&p->lock);
    free(old);
}

/* Room for the `len / entry` entries of a blob (NULL for none); *err: 0, EINVAL or ENOMEM. */
static void *
entries(size_t len, size_t entry, size_t elem, size_t *count, int *err)
{
    *count = len / entry;
    *err = len % entry ? EINVAL : 0;
    if (*err || !*count)
        return NULL;
    void *t = calloc(*count, elem);
    if (!t)
        *err = ENOMEM;
    return t;
}

#define ENTRY_SIZE 40

int
pump_set_table(struct pump *p, const unsigned char *blob, size_t len, long budget)
{
    size_t count;
    int err;
    struct endpoint *t = entries(len, ENTRY_SIZE, sizeof *t, &count, &err);
    if (err)
        return err;
    for (size_t i = 0; i < count; i++) {
        const unsigned char *b = blob + ENTRY_SIZE * i;
        memcpy(t[i].addr, b, 16);
        t[i].port = (uint16_t)(b[16] << 8 | b[17]);
        memcpy(t[i].to, b + 18, 16);
        t[i].to_port = (uint16_t)(b[34] << 8 | b[35]);
        memcpy(&t[i].name, b + 36, 4);
    }
    pthread_mutex_lock(&p->lock);
    if (budget >= 0)
        p->budget = budget;
    pthread_mutex_unlock(&p->lock);
    swap(p, (void **)&p->table, &p->count, t, count);
    return 0;
}

#define NAME_ENTRY_SIZE 272

int
pump_set_names(struct pump *p, const unsigned char *blob, size_t len)
{
    size_t count;
    int err;
    struct name *t = entries(len, NAME_ENTRY_SIZE, sizeof *t, &count, &err);
    if (err)
        return err;
    for (size_t i = 0; i < count; i++) {
        const unsigned char *b = blob + NAME_ENTRY_SIZE * i;
        memcpy(t[i].text, b, 255);
        t[i].text[255] = 0;
        memcpy(t[i].fake, b + 256, 4);
        memcpy(&t[i].id, b + 260, 4);
        memcpy(&t[i].until_ns, b + 264, 8);
    }
    swap(p, (void **)&p->names, &p->n_names, t, count);
    return 0;
}

void
pump_give_back(struct pump *p, long n)
{
    pthread_mutex_lock(&p->lock);
    p->budget += n;
    pthread_mutex_unlock(&p->lock);
}

void
pump_release(struct pump *p)
{
    release(p);
}
