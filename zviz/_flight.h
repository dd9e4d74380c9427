/* zviz/_flight.h: the fast half of direct egress's checks (zviz/_flight.c). */
#ifndef ZVIZ_FLIGHT_H
#define ZVIZ_FLIGHT_H

#include <stddef.h>

#define FLIGHT_OK 1      /* one whole first flight Python would pass, nothing after it */
#define FLIGHT_MORE 0    /* incomplete: wait for more */
#define FLIGHT_PYTHON -1 /* anything else: Python decides */

int flight_check(const unsigned char *buf, size_t len, const char *name, int port);

/* A standard query with one question of class IN: its name (lower case,
 * dotted, no final dot) in `name`, its type, and where the question ends.
 * 0, or -1 for anything else (Python's). */
int dns_query_name(const unsigned char *q, size_t len, char *name, size_t name_size, unsigned *qtype,
                   size_t *question_end);
/* The answer to that query: an A record with `addr` for type A, none for
 * any other type (NOERROR). Its length, or 0 if `out` is too small. */
size_t dns_answer(const unsigned char *q, size_t question_end, unsigned qtype, const unsigned char addr[4],
                  unsigned char *out, size_t out_size);

#endif
