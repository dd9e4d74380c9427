/* zviz/_pump.h: a listener's notifications received by a thread (zviz/_pump.c). */
#ifndef ZVIZ_PUMP_H
#define ZVIZ_PUMP_H

#include <linux/seccomp.h>
#include <stddef.h>
#include <stdint.h>

/* What the thread tells Python, one record per SOCK_SEQPACKET message. */
enum pump_kind {
    PUMP_NOTIF = 1,      /* a notification for Python to decide and answer */
    PUMP_CONNECTED = 2,  /* a connect performed and answered here (err: its answer) */
    PUMP_INPROGRESS = 3, /* a blocking connect under way: Python waits for it (the socket and the
                          * task's pidfd come with the record, by SCM_RIGHTS) */
    PUMP_HUP = 4,        /* no task of the filter is left: the thread has ended */
    PUMP_FAILED = 5,     /* receiving failed (err): the thread has ended */
    PUMP_GATED = 6,      /* a direct egress connect made and answered: its socket and capture pair
                          * come with it (SCM_RIGHTS) for Python to check the first flight */
    PUMP_GATE_FAILED = 7, /* a direct egress connect refused (EAGAIN) because the gate failed (err) */
    PUMP_CHECKED = 8,    /* a first flight checked and sent on here: the socket comes with it (for its cookie) */
    PUMP_CHECK_CUT = 9,  /* a first flight sent on, then the connection cut (early data; err: a short send) */
    PUMP_DNS = 10,       /* a DNS datagram for Python: fd is which socket (0 IPv4, 1 IPv6), err its length;
                          * after the record: the sender's sockaddr (28 bytes), then the datagram */
};

struct pump_record {
    int32_t kind;
    int32_t err;
    int32_t fd;      /* the child's fd number (connect) */
    int32_t cloexec; /* PUMP_INPROGRESS: the child's fd was close-on-exec */
    int32_t name;    /* direct egress: the name's id (PUMP_GATED; PUMP_INPROGRESS when gated), else -1 */
    int32_t port;    /* the port the sandbox connected to */
    unsigned char key[48]; /* PUMP_GATED: the gate's key (struct gate_key) */
    struct seccomp_notif notif;
};

/* The blank network namespace: at most this many live sockets in a sandbox's own namespace (they are made
 * by the host, so charged to the host's memory cgroup, not the sandbox's; zviz/_sockets.py MAX_LIVE). */
#define PUMP_MAX_LIVE_SOCKETS 4096
/* How many sockets the network namespace of the calling thread holds (sockstat: every family, bound or not), or -1. */
long count_sockets_here(void);

struct pump;

/* Start the thread (it duplicates the fds). `netns` and `gate` (direct
 * egress: the sandbox's network namespace and the gate's map) or -1 both.
 * NULL and *err on failure. */
/* `sockets_ns` (the blank network namespace: the sandbox's own, or -1) and `sockets_allow` (1 socket, 2
 * socketpair): the thread makes those sockets there (never with `netns`). */
struct pump *pump_start(int listener, int out, int stop, int netns, int gate, int dns4, int dns6, int sockets_ns,
                        int sockets_allow, int *err);
/* Direct egress: the names Python has checked (272-byte entries: the name, NUL-padded to 256; the
 * sandbox's IPv4 address for it; its id, int32; until when, int64 ns of CLOCK_MONOTONIC). */
int pump_set_names(struct pump *p, const unsigned char *blob, size_t len);
/* Replace the table: `len / 40` entries of a 16-byte address (IPv4 mapped
 * into IPv6) and a 2-byte port in network order, where it goes (the same
 * two), and the name's id (int32, native order; -1: not gated). `budget`
 * (if >= 0): how many gated connects it may make from now. 0 or an errno. */
int pump_set_table(struct pump *p, const unsigned char *blob, size_t len, long budget);
/* `n` gated connects ended: the thread may make as many more. */
void pump_give_back(struct pump *p, long n);
/* Python's reference goes (the thread ends on stop_fd or POLLHUP). */
void pump_release(struct pump *p);

#endif
