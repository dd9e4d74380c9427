/* zviz/_gate.h: a connection's first flight held for the host (zviz/_gate.c). */
#ifndef ZVIZ_GATE_H
#define ZVIZ_GATE_H

#include <stddef.h>
#include <stdint.h>

#define GATE_MAX_ENTRIES 65536 /* two per connection held at once, every sandbox of the process */
#define GATE_SOCKET 0          /* the key's kind: the connection's own socket */
#define GATE_CAPTURE 1         /* the key's kind: where its sends wait */

/* The key, as the SK_MSG program builds it from struct sk_msg_md. */
struct gate_key {
    uint32_t family;
    uint32_t remote[4]; /* IPv4: word 0 */
    uint32_t local[4];
    uint32_t remote_port; /* network order, upper half */
    uint32_t local_port;  /* host order */
    uint32_t kind;
};

/* The map and its program (attached); the program lets sends of process
 * `tgid` (as the root pid namespace numbers it) pass. 0 or -errno; the
 * verifier's log in `log` on a refusal. */
int gate_open(int tgid, int *map_fd, int *prog_fd, char *log, size_t log_size);
/* Hold TCP socket `up`'s sends in `capture` (a socket the map accepts: an
 * AF_UNIX stream one); its key in *key. 0 or -errno. */
int gate_add(int map, int up, int capture, struct gate_key *key);
int gate_key_of(int up, struct gate_key *key);
/* Take one entry out. 0 or -errno (ENOENT: already out, e.g. U was closed). */
int gate_remove_one(int map, const struct gate_key *key);

#endif
