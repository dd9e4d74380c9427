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
};

struct pump_record {
    int32_t kind;
    int32_t err;
    int32_t fd;      /* the child's fd number (connect) */
    int32_t cloexec; /* PUMP_INPROGRESS: the child's fd was close-on-exec */
    struct seccomp_notif notif;
};

struct pump;

/* Start the thread (it duplicates the three fds). NULL and *err on failure. */
struct pump *pump_start(int listener, int out, int stop, int *err);
/* Replace the allow table: `len / 18` entries of a 16-byte address (IPv4
 * mapped into IPv6) and a 2-byte port in network order. 0 or an errno. */
int pump_set_table(struct pump *p, const unsigned char *blob, size_t len);
/* Python's reference goes (the thread ends on stop_fd or POLLHUP). */
void pump_release(struct pump *p);

#endif
